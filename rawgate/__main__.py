"""The `rawgate` command line. Each subcommand lives in its own module (rawgate/cli/) that provides
`add_parser(subparsers)` and `run(args) -> int`, so the parts of the CLI evolve independently."""

from __future__ import annotations

import argparse
import sys

from rawgate import __version__
from rawgate.cli import (
    accounts as cli_accounts,
    emulate as cli_emulate,
    keys as cli_keys,
    logs as cli_logs,
    serve as cli_serve,
)

_COMMANDS = (cli_serve, cli_emulate, cli_accounts, cli_keys, cli_logs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rawgate",
        description="A local gateway that lets any OpenAI client use Google Gemini.",
    )
    p.add_argument("--version", action="version", version=f"rawgate {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _COMMANDS:
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    result: int = run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
