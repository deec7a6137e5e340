"""The inbound HTTP/2 flood guard: h2 plus per-frame flood accounting, which h2 leaves to the
application.

Invariants:
- Counted per frame as h2 parses it (compat.FrameHookH2 calls `on_frame` before h2 acts on the
  frame), so a flood stops at the frame that crossed its cap: raising DenialOfServiceError makes
  h2 drop the rest of the batch. The caps are limits.h2_max_* (pings, settings, resets, no-op
  frames per second; empty DATA frames in a row).
- Rates are per one-second window rolled once per receive (`new_batch`), not per frame.
- WINDOW_UPDATEs are free up to the credit our own DATA frames earned the peer (`wu_credit`).
- The guard runs whatever compat.fast_paths() says: it is protection, not a fast path. The switch
  only picks the dispatch under it (compat.FrameHookH2) and whether open_inbound_streams takes
  its shortcut.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

from h2.exceptions import DenialOfServiceError

from rawgate.compat import FrameHookH2, acknowledge_connection_data

if TYPE_CHECKING:
    from h2.config import H2Configuration
    from hyperframe.frame import Frame

    from rawgate.config import LimitsConfig

__all__ = ["GuardedH2"]


class GuardedH2(FrameHookH2):
    """h2 plus per-frame flood accounting, which h2 leaves entirely to the application.

    Counting happens in `on_frame`, which compat.FrameHookH2 calls from h2's per-frame hook,
    because many flood frames produce no event at all: RST_STREAM or WINDOW_UPDATE on a closed
    stream are silently absorbed. Raising DenialOfServiceError there makes h2 stop parsing the
    batch at once, so a flood of ten thousand PINGs queues at most `cap` PING ACKs.
    """

    def __init__(self, config: H2Configuration, limits: LimitsConfig) -> None:
        super().__init__(config)
        self._lim = limits
        self._window_start = -math.inf
        self.pings = self.settings_frames = self.resets = self.noop = self.empty_run = 0
        # WINDOW_UPDATEs the peer has earned: two per DATA frame we sent (stream + connection).
        self.wu_credit = 0
        self.stream_cap = 2**31  # the hard MAX_CONCURRENT_STREAMS, set by _new_h2

    def new_batch(self, now: float) -> None:
        """Roll the one-second rate window; called once per receive, not per frame."""
        if now - self._window_start >= 1.0:
            self._window_start = now
            self.pings = self.settings_frames = self.resets = self.noop = 0

    def on_frame(self, frame: Frame) -> None:
        t = cast(int, frame.type)
        lim = self._lim
        if t == 0x0:  # DATA
            st = self.streams.get(frame.stream_id)
            if st is None or st.closed:
                # h2 answers each with its own RST_STREAM (and refunds the window): no work for
                # us, some for the peer to make us do.
                self._count_noop()
            if frame.data:  # type: ignore[attr-defined]
                self.empty_run = 0
            elif "END_STREAM" not in frame.flags:
                self.empty_run += 1
                if self.empty_run > lim.h2_max_empty_frames:
                    raise DenialOfServiceError("empty DATA frame flood")
        elif t == 0x1:  # HEADERS: real work, so not an empty-frame run
            self.empty_run = 0
        elif t == 0x6:  # PING
            if "ACK" not in frame.flags:
                self.pings += 1
                if self.pings > lim.h2_max_pings_per_s:
                    raise DenialOfServiceError("PING flood")
        elif t == 0x4:  # SETTINGS
            if "ACK" not in frame.flags:
                self.settings_frames += 1
                if self.settings_frames > lim.h2_max_settings_per_s:
                    raise DenialOfServiceError("SETTINGS flood")
        elif t == 0x3:  # RST_STREAM
            self.resets += 1
            if self.resets > lim.h2_max_resets_per_s:
                raise DenialOfServiceError("RST_STREAM flood")
        elif t == 0x8:  # WINDOW_UPDATE
            if self.wu_credit > 0:
                self.wu_credit -= 1
            else:
                self._count_noop()
        elif t == 0x2 or t > 0x9:  # PRIORITY, ALTSVC from a client, unknown extension types
            self._count_noop()

    @property
    def open_inbound_streams(self) -> int:
        # h2 asks this on every new HEADERS and answers by walking (and sweeping) every stream:
        # O(streams) per request. Below the cap the dict size is an upper bound that is good
        # enough; the exact count (and the sweep of closed streams) runs only near the cap, which
        # also bounds how many closed streams h2 keeps around. The cap is the hard one _new_h2
        # sets (reading local_settings costs ~3 us of enum lookups per request).
        n = len(self.streams)
        if n < self.stream_cap and self.fast_dispatch:
            return n
        return super().open_inbound_streams

    def acknowledge_connection_data(self, n: int) -> None:
        """Hand `n` dropped bytes back to the connection window only (compat). The stream's
        window stays shut: a stream whose body nobody will read must not be invited to send
        more."""
        acknowledge_connection_data(self, n)

    def _count_noop(self) -> None:
        self.noop += 1
        if self.noop > self._lim.h2_max_noop_frames_per_s:
            raise DenialOfServiceError("flood of frames that carry no work")
