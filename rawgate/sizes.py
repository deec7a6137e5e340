"""Bytes a JSON-like value holds in memory, for caches bounded by bytes.

Invariant: an upper estimate. Every dict, list and scalar reached is counted at its
`sys.getsizeof`, once per reference: a string shared by two dicts (or between entries of a cache)
is counted at each use, so what a cache reports never undercounts what it keeps alive. Iterative
(no recursion limit) and O(objects): a 30 MiB base64 string is one object.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["deep_size"]


def deep_size(value: Any) -> int:
    size = sys.getsizeof
    total = 0
    todo = [value]
    while todo:
        v = todo.pop()
        total += size(v)
        if isinstance(v, dict):
            for k, item in v.items():
                total += size(k)
                if isinstance(item, dict | list):
                    todo.append(item)
                else:
                    total += size(item)
        elif isinstance(v, list):
            for item in v:
                if isinstance(item, dict | list):
                    todo.append(item)
                else:
                    total += size(item)
    return total
