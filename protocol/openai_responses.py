"""The engine's outputs -> OpenAI-compatible response bodies and server-sent-event chunks.

One `Choice` per request follows its outputs: the text and log-probabilities new in each
(for a streamed chunk) and all of them (for a whole response). Log-probabilities are the
target's, after temperature, top-k and top-p (`runtime.rejection`); tokens are shown as
their decoded text, as other OpenAI-compatible servers do. The finished response carries
SmartSpec's `speculation` field (what speculation did for the request) and `timings` (the
server's own queue, first-token and end-to-end times, in milliseconds).
"""

from __future__ import annotations

import json
import time

from engine.output import RequestOutput

# JSON has no -inf; a token the processed distribution excludes cannot be emitted, so this
# only ever stands in for an underflow.
_FLOOR = -9999.0


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Choice:
    """The response to one request, built from its `RequestOutput`s in order."""

    def __init__(self, request_id: str, chat: bool, model: str, token_text, logprobs: bool):
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.chat, self.model = chat, model
        self.created = int(time.time())
        self.token_text = token_text  # token id -> its text, for log-probabilities
        self.want_logprobs = logprobs
        self.text: list[str] = []
        self.logprobs: list[dict] = []  # chat entries, or completion (token, logprob, top, offset) rows
        self.offset = 0
        self.tokens = 0  # generated so far
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.speculation: dict | None = None
        self.timings: dict | None = None

    def add(self, out: RequestOutput, prompt_tokens: int) -> tuple[str, list[dict]]:
        """Records one output; returns its new text and log-probability entries."""
        self.text.append(out.text)
        self.tokens += len(out.token_ids)
        entries = [self._entry(t, lp) for t, lp in zip(out.token_ids, out.logprobs or ())]
        self.logprobs.extend(entries)
        if out.finish_reason is not None:
            seq = out.seq
            self.finish_reason = out.finish_reason
            completion = len(seq.output_ids)
            self.usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            }
            steps = seq.num_spec_steps
            self.speculation = {
                "proposed_tokens": seq.num_proposed,
                "accepted_tokens": seq.num_accepted,
                "speculative_steps": steps,
                "mean_accepted_length": (seq.num_accepted + steps) / steps if steps else 0.0,
            }
            now = time.monotonic()
            self.timings = {
                "queue_ms": ((seq.first_scheduled_time or now) - seq.arrival_time) * 1e3,
                "time_to_first_token_ms": ((seq.first_token_time or now) - seq.arrival_time) * 1e3,
                "e2e_ms": (now - seq.arrival_time) * 1e3,
            }
        return out.text, entries

    def _entry(self, token: int, lp) -> dict:
        text = self.token_text(token)
        value = max(lp.logprob, _FLOOR)
        if self.chat:
            top = [
                {"token": (s := self.token_text(t)), "logprob": max(v, _FLOOR), "bytes": list(s.encode())}
                for t, v in lp.top
            ]
            return {"token": text, "logprob": value, "bytes": list(text.encode()), "top_logprobs": top}
        entry = {"token": text, "logprob": value, "top": {self.token_text(t): max(v, _FLOOR) for t, v in lp.top}}
        entry["offset"] = self.offset
        self.offset += len(text)
        return entry

    def _logprobs(self, entries: list[dict]) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": entries}
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [e["top"] for e in entries],
            "text_offset": [e["offset"] for e in entries],
        }

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def response(self) -> dict:
        """The whole response, once finished."""
        text, logprobs = "".join(self.text), self._logprobs(self.logprobs)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": logprobs, "finish_reason": self.finish_reason}
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return body | {"usage": self.usage, "speculation": self.speculation, "timings": self.timings}

    def chunk(self, text: str, entries: list[dict], first: bool = False) -> dict:
        """A streamed chunk with the text new since the last one (the finish reason and the
        speculation stats on the last)."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": self._logprobs(entries) if entries else None, "finish_reason": self.finish_reason}
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if self.finish_reason is not None:
            body |= {"speculation": self.speculation, "timings": self.timings}
        return body

    def usage_so_far(self, prompt_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": prompt_tokens + self.tokens,
        }

    def usage_chunk(self) -> dict:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", []) | {"usage": self.usage}
