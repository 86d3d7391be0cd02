"""A request's output as it grows: stop tokens, the length limit, stop strings and text deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.scheduler import Sequence


class TextStream:
    """Turns a growing list of output ids into text deltas, decoding only the newest tokens.

    Each update decodes a short window twice, the tokens already read (from the previous
    read's start) and the same plus the new ones, and appends the difference: a tokenizer
    that merges a leading space or bytes across tokens sees the context it needs, and the
    cost per step stays constant instead of growing with the output. New tokens that end in
    an incomplete character wait for the rest. Text that could still be the start of a stop
    string is held back until it is safe to send.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.decode = _decoder(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.confirmed = ""  # the text of output_ids[:read]
        self.text = ""  # confirmed plus what the tokens after `read` decode to so far
        self.sent = 0  # characters of self.text already sent
        self.prefix = 0  # output_ids[prefix:read]: the context the next window is decoded with
        self.read = 0

    def update(self, output_ids: list[int]) -> str | None:
        """Decodes the tokens new since the last update; returns the matched stop string, if any."""
        searched = len(self.confirmed)
        context = self.decode(output_ids[self.prefix : self.read])
        new = self.decode(output_ids[self.prefix :])[len(context) :]
        self.text = self.confirmed + new
        if new and not new.endswith("\ufffd"):
            self.confirmed = self.text
            self.prefix, self.read = self.read, len(output_ids)
        search_from = max(0, searched - self.hold)
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
            end = min(end - self.hold, len(self.text.rstrip("\ufffd")))
        if end <= self.sent:
            return ""
        out = self.text[self.sent : end]
        self.sent = end
        return out


class FinishReason:
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"  # the step serving the request failed; it was dropped


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    matched_stop: str = ""  # the stop string or token that ended it
    seq: Sequence | None = field(default=None, repr=False)
    error: str = ""  # what went wrong, for FinishReason.ERROR
    logprobs: list | None = None  # runtime.rejection.TokenLogprob per token id, when the request asked


def emit(
    seq: Sequence, new_tokens: list[int], stream: TextStream | None, eos_token_ids: frozenset[int]
) -> RequestOutput:
    """Applies stop tokens, max_new_tokens and stop strings to the tokens just appended to
    `seq.output_ids` (truncating them), and returns what to send (no text without a stream)."""
    params = seq.params
    base = len(seq.output_ids) - len(new_tokens)
    reason, matched = None, ""
    for j, token in enumerate(new_tokens):
        if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
            del seq.output_ids[base + j + 1 :]
            reason, matched = FinishReason.STOP, stream.tokenizer.decode([token]) if stream else str(token)
            break
    limit = params.max_new_tokens
    if len(seq.output_ids) > limit or (len(seq.output_ids) == limit and reason is None):
        del seq.output_ids[limit:]
        reason, matched = FinishReason.LENGTH, ""
    hit = stream.update(seq.output_ids) if stream else None
    if hit is not None:
        reason, matched = FinishReason.STOP, hit
    return RequestOutput(
        seq.request_id,
        seq.output_ids[base:],
        stream.delta(final=reason is not None) if stream else "",
        reason,
        matched,
        seq,
    )


def _decoder(tokenizer):
    """ids -> text without special tokens; straight through a fast tokenizer's backend when
    transformers' own decode would add nothing (it costs more than the decoding itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
