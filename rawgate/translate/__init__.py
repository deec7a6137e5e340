"""Translation between the client protocols and Gemini: pure (bytes and records in, bytes and records out), never imports anyio or any I/O module; depends on the base modules only."""
