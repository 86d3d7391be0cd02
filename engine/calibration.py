"""Timing the target's forward pass before serving: rows that seed the cost model.

Rows are `{"B", "q", "ctx", "ms"}`, as in `controller.profile`. Calibration runs
before the engine serves: it borrows free KV blocks, whose contents do not
matter for timing.
"""

from __future__ import annotations

import time

from engine.engine import Engine
from runtime.cpu_linear import CpuLinear
from runtime.model_runner import ForwardItem

# (B, q) shapes timed at start-up. Batch 1 is timed densely: CPU kernels step where
# they change kernel or blocking, which a sparse grid would smooth over; the row
# counts where the model's CPU linear layers change product are added to these.
CALIBRATION_SHAPES = (
    *((1, q) for q in (1, 2, 3, 4, 5, 8, 9, 16, 17)),
    *((b, q) for b in (4, 16) for q in (1, 2, 4, 8)),
)


def calibration_shapes(model) -> list[tuple[int, int]]:
    """CALIBRATION_SHAPES plus, at batch 1, the last row count of each product the model's CPU
    linear layers use and the first of the next: this machine's cliffs, not another's."""
    edges = set()
    for m in model.modules():
        if isinstance(m, CpuLinear):
            edges.update(q for n in range(2, 33) if m.plan[n] != m.plan[n - 1] for q in (n - 1, n))
    batch_one = sorted({q for b, q in CALIBRATION_SHAPES if b == 1} | edges)
    return [(1, q) for q in batch_one] + [shape for shape in CALIBRATION_SHAPES if shape[0] > 1]


def calibrate(engine: Engine, shapes=None, ctx: int = 128) -> list[dict]:
    """One timed forward per (B, q) shape after a warm-up (default: the engine's model's
    `calibration_shapes`); a small cache skips shapes it cannot hold."""
    shapes = shapes if shapes is not None else calibration_shapes(engine.runner.model)
    rows = []
    for b, q in shapes:
        ms = time_forward(engine, b, q, ctx, warm_up=True)
        if ms is not None:
            rows.append({"B": b, "q": q, "ctx": ctx, "ms": ms})
    return rows


def time_forward(engine: Engine, batch: int, q: int, ctx: int, warm_up: bool = False) -> float | None:
    """Milliseconds of one forward of `batch` requests feeding q tokens each over ctx cached
    ones; None when the free blocks cannot hold it."""
    allocator = engine.allocator
    if batch * allocator.blocks_needed([], ctx + q) > allocator.num_free:
        return None
    tables = [[] for _ in range(batch)]
    for table in tables:
        allocator.grow(table, ctx + q)
    try:
        items = [ForwardItem([0] * q, ctx, table, q) for table in tables]
        if warm_up:
            engine.runner.forward(items)
        start = time.perf_counter()
        engine.runner.forward(items)
        return (time.perf_counter() - start) * 1e3
    finally:
        for table in tables:
            allocator.free(table)
