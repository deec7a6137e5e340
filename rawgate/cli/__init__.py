"""The command line: `rawgate serve | emulate | accounts | keys`, and the stack that assembles a running server. The top of the dependency graph."""
