"""Incremental detokenization: each step decodes a short window of ids, never the whole sequence, and stop strings
are matched on the newly grown text only.

The window starts a few tokens back (vLLM's prefix/read offsets): byte-level BPE tokens can split one character,
so new text is only emitted once the window no longer ends in half a character (U+FFFD). A character is at most
4 bytes and a token at least one, so a window still unfinished after MAX_PENDING tokens holds bytes that will never
form one (a run of lone continuation bytes, which a logit_bias can force): it is then emitted up to its last
complete character, so the window never grows and each step costs a bounded decode. Text that may grow into a
stop string is held back until it cannot. Each stop string is followed by a Knuth–Morris–Pratt automaton fed only
the new characters, so a step costs the length of its new text whatever the stop strings' length (re-testing every
prefix of a long stop string at every step would let one request slow down the whole batch); a string's table is
built once and shared by every sequence that stops on it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

MAX_PENDING = 4  # tokens the window may hold past its last complete character before they are taken as they are


@lru_cache(maxsize=256)
def _fallback(stop: str) -> tuple[int, ...]:
    """fallback[i]: the length of the longest proper border of stop[:i + 1] (KMP's failure function)."""
    fallback = [0] * len(stop)
    border = 0
    for i in range(1, len(stop)):
        while border and stop[i] != stop[border]:
            border = fallback[border - 1]
        border += stop[i] == stop[border]
        fallback[i] = border
    return tuple(fallback)


class StopMatcher:
    """Where one stop string occurs in a text fed piece by piece, and how much of it the text ends with."""

    def __init__(self, stop: str):
        self.stop = stop
        self.fallback = _fallback(stop)
        self.partial = 0  # how many leading characters of the stop string the text fed so far ends with

    def feed(self, piece: str) -> int:
        """→ the index in `piece` just past the first full occurrence completed in it, or -1."""
        stop, fallback, state = self.stop, self.fallback, self.partial
        for i, char in enumerate(piece):
            while state and char != stop[state]:
                state = fallback[state - 1]
            state += char == stop[state]
            if state == len(stop):
                self.partial = 0
                return i + 1
        self.partial = state
        return -1


class Detokenizer:
    def __init__(self, decode: Callable[[list[int]], str] | None, stops: tuple[str, ...] = ()):
        self.decode = decode
        self.matchers = [StopMatcher(stop) for stop in stops]
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.emitted = 0  # how much of it was handed out

    def update(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """ids: all output ids so far → (new text to hand out, whether a stop string was hit). When several stop
        strings occur in the text, it is cut where the earliest of them begins."""
        if self.decode is None:
            return "", False
        before = self.decode(ids[self.prefix_offset : self.read_offset])
        read_to = len(ids)
        window = self.decode(ids[self.prefix_offset :])
        if not final and window.endswith("\ufffd") and read_to - self.read_offset > MAX_PENDING:
            read_to = self._last_complete(ids)
            window = self.decode(ids[self.prefix_offset : read_to])
        if len(window) > len(before) and (final or read_to < len(ids) or not window.endswith("\ufffd")):
            piece = window[len(before) :]
            grown_from = len(self.text)
            self.text += piece
            self.prefix_offset, self.read_offset = self.read_offset, read_to
            starts = [grown_from + end - len(m.stop) for m in self.matchers if (end := m.feed(piece)) >= 0]
            if starts:
                self.text = self.text[: min(starts)]
                return self._emit(len(self.text)), True
        held = 0 if final else max((m.partial for m in self.matchers), default=0)
        return self._emit(len(self.text) - held), False

    def _last_complete(self, ids: list[int]) -> int:
        """Where the window's last complete character ends: the latest cut among its last tokens whose text does
        not end in half a character (a character spans at most 4 tokens); else all but the last 3 tokens, whose
        bytes may still become one."""
        for end in range(len(ids) - 1, len(ids) - 4, -1):
            if end > self.read_offset and not self.decode(ids[self.prefix_offset : end]).endswith("\ufffd"):
                return end
        return len(ids) - 3

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted : max(upto, self.emitted)]
        self.emitted = max(upto, self.emitted)
        return delta
