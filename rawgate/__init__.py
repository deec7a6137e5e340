"""rawgate: a local gateway that lets any OpenAI client use Google Gemini.

The data path, one module per step:
  listener -> h1_server | h2_server -> app (routes, auth) -> schemas (decode) -> router (model)
  -> accounts (pick) -> mapping (OpenAI -> Gemini) -> upstream pool (h1_client | h2_client)
  -> sse + transcoders (Gemini -> OpenAI) -> back through the sink to the client.
"""

from __future__ import annotations

__version__ = "0.1.0"
