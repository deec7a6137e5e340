"""The built-in Gemini emulator (Developer API, Code Assist, OAuth): a sans-IO core and two engines. May use http (its standard engine is rawgate's own listener); never imports the gateway."""
