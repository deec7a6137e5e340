"""`rawgate emulate`: placeholder until its issue lands."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("emulate", help="emulate (not yet available)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print("rawgate emulate: not yet available")
    return 1
