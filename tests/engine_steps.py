"""Driving `Engine.step()` (a coroutine) from synchronous tests, on one event loop per session."""

from __future__ import annotations

import asyncio

_runner = asyncio.Runner()


def step(engine):
    return _runner.run(engine.step())


def run_until_done(engine) -> tuple[dict[str, list[int]], list]:
    """Steps until the engine is idle: (tokens per request id, every step's record)."""
    out: dict[str, list[int]] = {}
    records = []
    while engine.has_work():
        for o in step(engine):
            out.setdefault(o.request_id, []).extend(o.token_ids)
        records.append(engine.last_step)
    return out, records
