"""Choosing the CPU linear product per weight shape and row count, by timing the candidates here.

For each distinct weight (shape, dtype) the candidates of `runtime.cpu_linear` are
timed on random rows at both ends of each bucket of row counts (BUCKETS: 1, 2, 3,
4, then 5-8, 9-16, 17-32, 33-64), and each bucket takes the product with the least
time summed over its two ends: the transposed product pads to a power of two, so
its cost is flat within a bucket, while the others grow across it, and the top
alone would favour the padded product everywhere below it. The model takes one
product per bucket, the least total time over its layers, and a weight shape takes
its own only where that saves it more than SHAPE_TIE. They are timed where
they run, among the model's layers in order (up to TIMED_PER_SHAPE layers of each
shape), so weights come from memory as in a forward pass. The candidates run in
turn within each repetition, so drift on shared cores hits them alike, and the
median over repetitions decides. `F.linear` keeps the count unless another
product beats it by more than TIE: a packed copy of the weights costs memory,
and a win inside the noise is no win.

Timings depend on the CPU, the cores torch uses and torch's own kernels, so
they are cached per machine (CPU name, family, model and vector ISA; core count,
torch threads, torch version) in `cpu_linear.json` under $SMARTSPEC_CACHE_DIR
(default ~/.cache/smartspec): a restart reuses them, and a different CPU or torch
measures afresh. SmolLM2's
five shapes take about ten seconds to measure on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from runtime import model_thread
from runtime.cpu_linear import CHOICES, MAX_ROWS, CpuLinear, describe, kernels_for, pack, product

log = logging.getLogger(__name__)

BUCKETS = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 8), (9, 16), (17, 32), (33, MAX_ROWS))
TIMED_ROWS = tuple(sorted({n for bucket in BUCKETS for n in bucket}))
TIMED_PER_SHAPE = 4  # layers of each shape timed: four blocks in order keep every weight out of cache
TIE = 0.03  # F.linear stays unless another product is this much faster
SHAPE_TIE = 0.25  # one shape leaves the model's choice only for more than this gain


def cpu_model() -> str:
    """The CPU's name plus its family/model/stepping and widest vector ISA.

    Virtual machines often report a bare "AMD EPYC" or "Intel Xeon" for several
    generations whose fastest products differ, so the name alone cannot key the cache.
    """
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        info = ""
    return info or platform.processor() or platform.machine() or "unknown"


def parse_cpuinfo(text: str) -> str:
    """'<model name> (family F model M stepping S, <isa>)' from /proc/cpuinfo's first CPU."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    if not name:
        return ""
    flags = set(fields.get("flags", "").split())
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "")
    ids = " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    detail = ", ".join(x for x in (ids.replace("cpu family", "family"), isa) if x)
    return f"{name} ({detail})" if detail else name


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
def time_products(layers: list[nn.Linear], rows=TIMED_ROWS, reps: int = 3) -> dict:
    """{shape key: {rows: {product: median ms}}}, timed where the layers run: in the model's order,
    one pass over all of them per product, so each weight comes from memory as it does in a forward
    pass (timed alone, a small weight stays in cache and favours another product). Each shape's
    time sums its layers' calls; the products take turns within each repetition."""
    count: dict[str, int] = {}
    timed = []
    for m in layers:
        count[shape_key(m)] = count.get(shape_key(m), 0) + 1
        if count[shape_key(m)] <= TIMED_PER_SHAPE:
            timed.append(m)
    layers = timed
    kernels = {id(m): kernels_for(m.weight.dtype) for m in layers}
    packed = {id(m): pack(m.weight) for m in layers if "packed" in kernels[id(m)]}
    keys = {id(m): shape_key(m) for m in layers}
    names = list(dict.fromkeys(k for m in layers for k in kernels[id(m)]))
    timings: dict[str, dict] = {key: {} for key in keys.values()}
    dims = {(m.in_features, m.weight.dtype) for m in layers}
    # One untimed call at every size first: the allocator's first buffers of a new size
    # (fresh pages), and oneDNN's first primitive for it, cost several times a warm call.
    for n in rows:
        for m in layers:
            for kernel in kernels[id(m)]:
                product(
                    m.weight, m.bias, torch.randn(n, m.in_features, dtype=m.weight.dtype), kernel, packed.get(id(m))
                )
    for n in rows:
        inputs = {k: torch.randn(n, k[0], dtype=k[1]) for k in dims}
        samples = {key: {k: [] for k in names} for key in timings}
        for rep in range(reps + 1):  # the first pass warms up
            for kernel in names[rep % len(names) :] + names[: rep % len(names)]:
                spent: dict[str, float] = {}
                for m in layers:
                    if kernel not in kernels[id(m)]:
                        continue
                    x = inputs[(m.in_features, m.weight.dtype)]
                    start = time.perf_counter()
                    product(m.weight, m.bias, x, kernel, packed.get(id(m)))
                    spent[keys[id(m)]] = spent.get(keys[id(m)], 0.0) + time.perf_counter() - start
                if rep:
                    for key, s in spent.items():
                        samples[key][kernel].append(s * 1e3)
        for key, by_kernel in samples.items():
            timings[key][n] = {k: statistics.median(v) for k, v in by_kernel.items() if v}
    return timings


def _scores(timings: dict, lo: int, hi: int) -> dict[str, float]:
    """A shape's time per product summed over the bucket's two ends ({} when not timed there)."""
    ends = [timings[n] for n in {lo, hi} if n in timings]
    kernels = set.intersection(*(set(t) for t in ends)) if ends else set()
    return {k: sum(t[k] for t in ends) for k in kernels}


def _fastest(score: dict[str, float], keep: str, tie: float) -> str:
    """The least-time product, unless `keep` is within `tie` of it."""
    fastest = min(sorted(score), key=score.get)
    return keep if keep in score and score[keep] <= (1 + tie) * score[fastest] else fastest


def choose(timings: dict, weights: dict[str, float] | None = None) -> dict[str, tuple[str, ...]]:
    """plan[n] for n = 0..MAX_ROWS per shape, from {shape: {rows: {product: ms}}}.

    For each bucket the model as a whole takes the product with the least time over all its
    layers (each shape's time times `weights[shape]`, its layers per timed layer), F.linear
    unless another is more than TIE faster. A shape takes another product only where its own
    time with it is more than SHAPE_TIE below its time with the model's: the cheap layers'
    timings are the noisiest, and a choice they flip on noise costs more than it gains."""
    timings = {key: {int(n): t for n, t in by_rows.items()} for key, by_rows in timings.items()}
    weights = weights or dict.fromkeys(timings, 1.0)
    plans = {key: ["linear"] * (MAX_ROWS + 1) for key in timings}
    for lo, hi in BUCKETS:
        scores = {key: _scores(by_rows, lo, hi) for key, by_rows in timings.items()}
        common = set.intersection(*(set(s) for s in scores.values())) if scores else set()
        total = {k: sum(weights[key] * s[k] for key, s in scores.items()) for k in common}
        model_best = _fastest(total, "linear", TIE) if total else "linear"
        for key, score in scores.items():
            if score:
                plans[key][lo : hi + 1] = [_fastest(score, model_best, SHAPE_TIE)] * (hi - lo + 1)
    return {key: tuple([plan[1], *plan[1:]]) for key, plan in plans.items()}


class KernelSelector:
    """Decides the plan for each weight shape once per machine: from the cache file when it holds
    this machine's timings, else by timing (then written back)."""

    def __init__(self, path: Path | None = None, timer=time_products, machine_info: dict | None = None):
        self.path = path
        self.timer = timer
        self.machine = machine_info or machine()
        self.timings: dict[str, dict] = {}  # shape key -> {rows: {product: ms}} for this machine
        self._loaded = False

    def plans(self, layers: list[nn.Linear]) -> list[tuple[str, ...]]:
        """A plan per layer. Shapes without timings for this machine are timed among all the
        layers (their context), and only those are recorded."""
        self._load()
        missing = {shape_key(m) for m in layers} - set(self.timings)
        if missing:
            start = time.perf_counter()
            timed = self.timer(layers, TIMED_ROWS)
            self.timings.update({key: timed[key] for key in missing})
            log.info("cpu_linear: timed %d weight shapes in %.1f s", len(missing), time.perf_counter() - start)
            self._save()
        counts: dict[str, int] = {}
        for m in layers:
            counts[shape_key(m)] = counts.get(shape_key(m), 0) + 1
        weights = {key: n / min(n, TIMED_PER_SHAPE) for key, n in counts.items()}
        plans = choose({key: self.timings[key] for key in counts}, weights)
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
    selector measured for its shape (the machine's cached decision when there is one). Timed
    on the model thread, where the forwards will run (runtime.model_thread).

    Returns how many were switched; layers already switched keep their plan.
    """
    return model_thread.call(_use_cpu_linear, model, choice, selector)


def _use_cpu_linear(model: nn.Module, choice: str, selector) -> int:
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
