"""The fast engine's h2 send path (emulator/fast_h2.py) holds a large answer once: DATA frames
are views of it, not copies of its rest (no sockets: a recording transport)."""

from __future__ import annotations

import tracemalloc
from typing import Any, cast

from h2.settings import SettingCodes
from hyperframe.frame import DataFrame

from rawgate.emulator import fast_h2
from rawgate.emulator.core import Emulator
from tests.helpers_h2 import FrameFactory, FrameReader


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_a_multi_mb_body_is_framed_without_copying_its_rest() -> None:
    """6.5 MB sent at once into wide-open windows: the bytes held at the peak are the body plus
    the one joined write (re-slicing the rest per 16 KiB frame held ~2x the body, and copied
    O(n^2) bytes: 47 % of the emulator's CPU on a batchEmbedContents answer)."""
    ff = FrameFactory()
    t = _Transport()
    s = fast_h2.H2Session(Emulator(), cast(Any, None), cast(Any, t), 100, lambda: None)
    big = (1 << 31) - 1
    s.feed(ff.preface({SettingCodes.INITIAL_WINDOW_SIZE: big}) + ff.window_update(0, big - 65535))
    t.writes.clear()
    body = bytes(range(256)) * (6_500_000 // 256)
    s.streams[1] = fast_h2._Stream(s.peer_initial)
    tracemalloc.start()
    try:
        s._send(1, body, True)
        s.flush()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.2 * len(body)
    reader = FrameReader()
    for w in t.writes:
        reader.feed(w)
    data = reader.of_type(DataFrame)
    assert reader.body(1) == body
    assert len(data) == -(-len(body) // 16384) and "END_STREAM" in data[-1].flags
    assert 1 not in s.streams


def test_a_window_bound_tail_resumes_at_its_offset() -> None:
    """A body larger than the stream window goes out in window-sized turns, each resuming where
    the last stopped, and new bytes queued behind a waiting tail keep their order."""
    ff = FrameFactory()
    t = _Transport()
    s = fast_h2.H2Session(Emulator(), cast(Any, None), cast(Any, t), 100, lambda: None)
    s.feed(ff.preface({SettingCodes.INITIAL_WINDOW_SIZE: 1000}))
    s.streams[1] = fast_h2._Stream(s.peer_initial)
    body = bytes(range(256)) * 20  # 5,120 bytes
    s._send(1, body[:3000], False)
    s._send(1, body[3000:], True)  # queued behind the waiting tail
    reader = FrameReader()
    for _ in range(10):
        s.flush()
        for w in t.writes:
            reader.feed(w)
        t.writes.clear()
        if 1 not in s.streams:
            break
        s.feed(ff.window_update(1, 1000))
    assert reader.body(1) == body
    assert [len(f.data) for f in reader.of_type(DataFrame)] == [1000] * 5 + [120]
