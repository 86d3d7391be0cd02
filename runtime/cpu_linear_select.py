"""Choosing the CPU linear product per weight shape and row count, by timing the candidates here.

For each distinct weight (shape, dtype) the candidates of `runtime.cpu_linear` are
timed on random rows at a few row counts (ROW_BUCKETS); a row count uses the
product that was fastest at the bucket it rounds up to. The candidates run in
turn within each repetition, so drift on shared cores hits them alike, and the
median over repetitions decides. `F.linear` keeps the count unless another
product beats it by more than TIE: a packed copy of the weights costs memory,
and a win inside the noise is no win.

Timings depend on the CPU, the cores torch uses and torch's own kernels, so
they are cached per machine (CPU model, core count, torch threads, torch version)
in `cpu_linear.json` under $SMARTSPEC_CACHE_DIR (default ~/.cache/smartspec): a
restart reuses them, and a different CPU or torch measures afresh. SmolLM2's
five shapes take a few seconds to measure.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from runtime.cpu_linear import CHOICES, MAX_ROWS, CpuLinear, describe, kernels_for, pack, product

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, MAX_ROWS)
TIE = 0.03  # F.linear stays unless another product is this much faster
MIN_SAMPLE_S = 3e-4  # each timed sample repeats the product until it lasts about this long


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict:
    """What the fastest product depends on besides the weight's shape."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_path() -> Path:
    root = os.environ.get("SMARTSPEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smartspec"
    )
    return Path(root) / "cpu_linear.json"


def shape_key(layer: nn.Linear) -> str:
    bias = "+bias" if layer.bias is not None else ""
    return f"{layer.out_features}x{layer.in_features}{bias}:{str(layer.weight.dtype).removeprefix('torch.')}"


@torch.inference_mode()
def time_products(weight: torch.Tensor, bias, buckets=ROW_BUCKETS, kernels=None, reps: int = 5) -> dict:
    """{rows: {product: median ms}} for each bucket's row count, the products in turn per repetition."""
    kernels = kernels or kernels_for(weight.dtype)
    packed = pack(weight) if "packed" in kernels else None
    timings = {}
    for n in buckets:
        x = torch.randn(n, weight.shape[1], dtype=weight.dtype)
        calls = {}
        for kernel in kernels:  # warm-up, and how many calls make one sample
            start = time.perf_counter()
            product(weight, bias, x, kernel, packed)
            calls[kernel] = max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-7)))
        samples: dict[str, list[float]] = {k: [] for k in kernels}
        for rep in range(reps):
            for kernel in kernels[rep % len(kernels) :] + kernels[: rep % len(kernels)]:
                start = time.perf_counter()
                for _ in range(calls[kernel]):
                    product(weight, bias, x, kernel, packed)
                samples[kernel].append((time.perf_counter() - start) * 1e3 / calls[kernel])
        timings[n] = {k: statistics.median(v) for k, v in samples.items()}
    return timings


def choose(timings: dict) -> tuple[str, ...]:
    """plan[n] for n = 0..MAX_ROWS: the product fastest at the smallest timed row count >= n."""
    best = {}
    for n, by_kernel in timings.items():
        fastest = min(by_kernel, key=by_kernel.get)
        linear = by_kernel.get("linear")
        best[int(n)] = "linear" if linear is not None and linear <= (1 + TIE) * by_kernel[fastest] else fastest
    buckets = sorted(best)
    plan = []
    for n in range(MAX_ROWS + 1):
        plan.append(best[next((b for b in buckets if b >= n), buckets[-1])])
    return tuple(plan)


class KernelSelector:
    """Decides the plan for each weight shape once per machine: from the cache file when it holds
    this machine's timings, else by timing (then written back)."""

    def __init__(self, path: Path | None = None, timer=time_products, machine_info: dict | None = None):
        self.path = path
        self.timer = timer
        self.machine = machine_info or machine()
        self.timings: dict[str, dict] = {}  # shape key -> {rows: {product: ms}} for this machine
        self.measured: list[str] = []  # shape keys timed in this process (the others came from the cache)
        self._loaded = False

    def plans(self, layers: list[nn.Linear]) -> list[tuple[str, ...]]:
        self._load()
        fresh = False
        for layer in layers:
            key = shape_key(layer)
            if key not in self.timings:
                start = time.perf_counter()
                self.timings[key] = self.timer(
                    layer.weight.detach(), layer.bias, ROW_BUCKETS, kernels_for(layer.weight.dtype)
                )
                self.measured.append(key)
                fresh = True
                log.info("cpu_linear: timed %s in %.2f s", key, time.perf_counter() - start)
        if fresh:
            self._save()
        plans = {key: choose(self.timings[key]) for key in {shape_key(m) for m in layers}}
        return [plans[shape_key(m)] for m in layers]

    def _entries(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text()).get("machines", {})
        except (OSError, ValueError):
            log.warning("cpu_linear: ignoring unreadable cache %s", self.path)
            return {}

    def _machine_key(self) -> str:
        return json.dumps(self.machine, sort_keys=True)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        cached = self._entries().get(self._machine_key(), {})
        self.timings.update({k: {int(n): v for n, v in t.items()} for k, t in cached.items()})
        if cached:
            log.info("cpu_linear: timings for %d weight shapes from %s", len(cached), self.path)

    def _save(self) -> None:
        if self.path is None:
            return
        entries = self._entries()
        entries[self._machine_key()] = self.timings
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"machines": entries}, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home only costs the next start its measurement
            log.warning("cpu_linear: cannot write %s (%s)", self.path, exc)


_default: KernelSelector | None = None


def default_selector() -> KernelSelector:
    """One selector per process, so models loaded into one process share their measurements."""
    global _default
    if _default is None:
        _default = KernelSelector(cache_path())
    return _default


def use_cpu_linear(model: nn.Module, choice: str = "auto", selector=None) -> int:
    """Switches every plain CPU nn.Linear of `model` to CpuLinear in place (weights and ties kept),
    each with the product `choice` names for every row count, or for "auto" the fastest the
    selector measured for its shape (the machine's cached decision when there is one).

    Returns how many were switched; layers already switched keep their plan.
    """
    if choice not in CHOICES:
        raise ValueError(f"cpu_linear must be one of {', '.join(CHOICES)}, got {choice!r}")
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"]
    if choice == "packed" and any("packed" not in kernels_for(m.weight.dtype) for m in layers):
        raise ValueError("cpu_linear packed needs float32 weights and a torch build with oneDNN")
    plans = [(choice,) * (MAX_ROWS + 1)] * len(layers)
    if choice == "auto" and layers:
        plans = (selector or default_selector()).plans(layers)
    for m, plan in zip(layers, plans):
        m.__class__ = CpuLinear
        m.plan = plan
    if layers:
        log.info("cpu_linear %s: %s", choice, "; ".join(f"{s} rows {r}: {k}" for s, r, k in describe(model)))
    return len(layers)
