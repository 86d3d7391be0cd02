"""Incremental detokenisation and stop-string matching for one request."""

from __future__ import annotations

import os


class TextStream:
    """Turns a growing list of output ids into text deltas.

    Text that could still be the start of a stop string, or that ends in an
    incomplete character, is held back until it is safe to send.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of self.text already sent

    def update(self, output_ids: list[int]) -> str | None:
        """Decodes the output so far; returns the matched stop string, if any."""
        previous = self.text
        self.text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        # A completed multi-byte character replaces the '\ufffd' before it: search from
        # where the old and new text first differ, not from the old end.
        unchanged = os.path.commonprefix([previous, self.text])
        search_from = max(0, len(unchanged) - self.hold)
        best = None
        for stop in self.stops:
            at = self.text.find(stop, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def delta(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= self.hold
            if self.text.endswith("\ufffd"):
                end = min(end, len(self.text) - 1)
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out
