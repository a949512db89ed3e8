"""Incremental detokenization: each step decodes a short window of ids, never the whole sequence, and stop strings
are searched for in the newly grown tail only.

The window starts a few tokens back (vLLM's prefix/read offsets): byte-level BPE tokens can split one character,
so new text is only emitted once the window no longer ends in half a character (U+FFFD). Text that may grow into a
stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Callable


class Detokenizer:
    def __init__(self, decode: Callable[[list[int]], str] | None, stops: tuple[str, ...] = ()):
        self.decode, self.stops = decode, stops
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.emitted = 0  # how much of it was handed out
        self.longest_stop = max((len(s) for s in stops), default=0)

    def update(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """ids: all output ids so far → (new text to hand out, whether a stop string was hit)."""
        if self.decode is None:
            return "", False
        before = self.decode(ids[self.prefix_offset: self.read_offset])
        window = self.decode(ids[self.prefix_offset:])
        if len(window) > len(before) and (final or not window.endswith("\ufffd")):
            searched_from = max(0, len(self.text) - self.longest_stop + 1)
            self.text += window[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            for stop in self.stops:
                at = self.text.find(stop, searched_from)
                if at >= 0:
                    self.text = self.text[:at]
                    return self._emit(len(self.text)), True
        safe = len(self.text)
        if not final:
            for stop in self.stops:  # hold back a suffix that may grow into a stop string
                for n in range(min(len(stop) - 1, safe), 0, -1):
                    if self.text.endswith(stop[:n]):
                        safe = min(safe, len(self.text) - n)
                        break
        return self._emit(safe), False

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted: max(upto, self.emitted)]
        self.emitted = max(upto, self.emitted)
        return delta
