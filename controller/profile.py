"""Cost profiles: measured step times that seed the cost model before live steps arrive.

A profile is JSON with rows `{"B": batch, "q": new tokens per request, "ctx": KV tokens
per request before the step, "ms": forward time}`, either at the top level
(`{"rows": [...]}`, what `smartspec verifier` calibration writes) or per model
(`{"models": {name: {"rows": [...]}}}`, as in the GPU profiles measured offline).

A step log (`.jsonl`, or `.jsonl.gz` compressed; what `smartspec verifier --step-log` writes) is a profile too: a
first line `{"config": ...}` with the engine's cache and scheduler settings, then one
`StepRecord` per line with `at`, the monotonic time (s) the step ended. Its steps are
what the verifier really did under load, host work and sampling included.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from controller.step import StepRecord


def steps_from_rows(rows: list[dict]) -> list[StepRecord]:
    return [
        StepRecord(
            batch_size=int(r["B"]),
            num_batched_tokens=int(r["B"]) * int(r["q"]),
            num_kv_tokens=int(r["B"]) * (int(r["ctx"]) + int(r["q"])),
            verify_ms=float(r["ms"]),
        )
        for r in rows
    ]


def step_line(record: StepRecord, at: float) -> str:
    return json.dumps({**asdict(record), "at": round(at, 6)}, separators=(",", ":"))


@dataclass
class StepLog:
    config: dict  # the engine's {"cache": ..., "scheduler": ...} settings
    steps: list[StepRecord]
    ends: list[float]  # when each step ended (s, monotonic)


def read_step_log(path: str) -> StepLog:
    """A step log, plain or gzip-compressed (`.gz`)."""
    config, steps, ends = {}, [], []
    raw = Path(path).read_bytes()
    text = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode()
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "config" in row:
            config = row["config"]
            continue
        ends.append(float(row.pop("at")))
        row["planned_k"] = tuple(row["planned_k"])
        row["drafts"] = tuple(tuple(d) for d in row["drafts"])
        steps.append(StepRecord(**row))
    return StepLog(config, steps, ends)


def load_profile(path: str) -> list[StepRecord]:
    """`path` or `path#model` for a file with several models; a `.jsonl` step log gives its steps."""
    file, _, model = path.partition("#")
    if file.endswith((".jsonl", ".jsonl.gz")):
        return read_step_log(file).steps
    data = json.loads(Path(file).read_text())
    if "rows" in data:
        return steps_from_rows(data["rows"])
    models = data.get("models", {})
    if not models:
        raise ValueError(f"{file}: no 'rows' and no 'models' in the profile")
    name = model or next(iter(models))
    if name not in models:
        raise ValueError(f"{file}: no model {name!r}; it has {', '.join(models)}")
    return steps_from_rows(models[name]["rows"])
