"""Cost profiles: measured step times that seed the cost model before live steps arrive.

A profile is JSON with rows `{"B": batch, "q": new tokens per request, "ctx": KV tokens
per request before the step, "ms": forward time}`, either at the top level
(`{"rows": [...]}`, what `smartspec verifier` calibration writes) or per model
(`{"models": {name: {"rows": [...]}}}`, as in the GPU profiles measured offline).
"""

from __future__ import annotations

import json
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


def load_profile(path: str) -> list[StepRecord]:
    """`path` or `path#model` for a file with several models."""
    file, _, model = path.partition("#")
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
