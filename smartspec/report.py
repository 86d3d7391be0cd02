"""What a load run measured, per request and in summary, and the table it prints."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
STATS = ("mean", "p50", "p90", "p99")


def latency_stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(STATS)
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return {"mean": float(np.mean(values)), "p50": p50, "p90": p90, "p99": p99}


@dataclass
class RequestRecord:
    index: int
    prompt_chars: int
    send_s: float = 0.0  # offset from the benchmark start
    request_id: str = ""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    rounds: list[tuple[int, int, int]] = field(default_factory=list)  # (k, proposed, accepted) per round
    server_timings: dict[str, float] | None = None
    error: str | None = None


NO_FINISH = "NO_FINISH"  # error name for a stream that ended without a last chunk


class StreamClock:
    """One streamed request as the client sees it, whichever door: time to the first token,
    the gaps between tokens, then end-to-end and time per output token."""

    def __init__(self, record: RequestRecord, start: float):
        self.record = record
        self.sent = time.perf_counter()
        record.send_s = self.sent - start
        self.last_token_at: float | None = None
        self.tokens = 0

    def tokens_arrived(self, n: int) -> None:
        if not n:
            return
        now = time.perf_counter()
        if self.last_token_at is None:
            self.record.ttft_ms = (now - self.sent) * 1e3
        else:  # a chunk of several tokens stands for several steps: its gap is spread over them
            self.record.itl_ms.extend([(now - self.last_token_at) * 1e3 / n] * n)
        self.tokens, self.last_token_at = self.tokens + n, now

    def ended(self) -> None:
        r = self.record
        r.e2e_ms = (time.perf_counter() - self.sent) * 1e3
        if r.error is None and r.finish_reason is None:
            r.error = NO_FINISH
        r.completion_tokens = r.completion_tokens or self.tokens
        if r.ttft_ms is not None and r.completion_tokens > 1:
            r.tpot_ms = (r.e2e_ms - r.ttft_ms) / (r.completion_tokens - 1)


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    """Latency stats over successful requests; throughput over the whole run."""
    ok = [r for r in records if r.error is None]
    errors = [r.error for r in records if r.error is not None]
    values = {
        "ttft_ms": [r.ttft_ms for r in ok if r.ttft_ms is not None],
        "tpot_ms": [r.tpot_ms for r in ok if r.tpot_ms is not None],
        "itl_ms": [gap for r in ok for gap in r.itl_ms],
        "e2e_ms": [r.e2e_ms for r in ok if r.e2e_ms is not None],
    }
    output_tokens = sum(r.completion_tokens for r in ok)
    proposed = sum(r.proposed_tokens for r in ok)
    accepted = sum(r.accepted_tokens for r in ok)
    per_second = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
    return {
        **{name: latency_stats(values[name]) for name in LATENCY_METRICS},
        "completed": len(ok),
        "errors": len(errors),
        "error_codes": {code: errors.count(code) for code in sorted(set(errors))},
        "duration_s": duration_s,
        "output_tokens": output_tokens,
        "request_throughput": per_second(len(ok)),
        "output_throughput": per_second(output_tokens),
        "proposed_tokens": proposed,
        "accepted_tokens": accepted,
        "acceptance": accepted / proposed if proposed else None,
    }


def format_table(summary: dict) -> str:
    lines = [f"{'metric':<10}" + "".join(f"{s:>12}" for s in STATS)]
    for name in LATENCY_METRICS:
        cells = (summary[name][s] for s in STATS)
        lines.append(f"{name:<10}" + "".join(f"{_fmt(c, '.2f'):>12}" for c in cells))
    rows = [
        ("requests completed", str(summary["completed"])),
        ("requests failed", _errors_cell(summary)),
        ("duration (s)", _fmt(summary["duration_s"], ".2f")),
        ("request throughput (req/s)", _fmt(summary["request_throughput"], ".3f")),
        ("output throughput (tok/s)", _fmt(summary["output_throughput"], ".1f")),
        ("output tokens", str(summary["output_tokens"])),
        (
            "acceptance",
            _fmt(summary["acceptance"], ".3f") + f" ({summary['accepted_tokens']}/{summary['proposed_tokens']})",
        ),
    ]
    width = len(lines[0])
    lines.insert(1, "-" * width)
    lines.append("-" * width)
    lines.extend(f"{label:<28}{value}" for label, value in rows)
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _errors_cell(summary: dict) -> str:
    codes = ", ".join(f"{code} x{n}" for code, n in summary["error_codes"].items())
    return f"{summary['errors']}" + (f" ({codes})" if codes else "")
