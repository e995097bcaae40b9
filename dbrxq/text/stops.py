"""Text-level stop sequences (``--stop``, the API's ``stop``): matched on the detokenized stream, so a
stop string split across tokens is found, and text that could start one is held back until decided.
"""

from __future__ import annotations


class StopMatcher:
    """Finds the first of ``stops`` in a growing text; ``push`` returns (text safe to emit, matched)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = 0  # the longest tail of buf that starts some stop sequence
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:k]):
                    keep = k
                    break
        out = self.buf[:len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def cut_at_stop(text: str, stops) -> str:
    """``text`` up to the first occurrence of any of ``stops`` (what a stopped stream emitted)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(hits)] if hits else text
