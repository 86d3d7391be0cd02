"""Decode and verification steps run as compiled or captured graphs, one per padded shape.

A step whose requests all feed few tokens (decode, verification) is padded to a
bucket: requests up to the next of BATCH_BUCKETS (dummy requests with no
tokens), tokens per request up to the next of QUERY_BUCKETS, block tables to
a width (below). Every tensor shape of the forward then depends on the
bucket's three integers alone, so:

- `compile`: `torch.compile(fullgraph=True)` of layout derivation plus model,
  which takes the bucket's integers as arguments. The first bucket compiles
  with them as constants; a bucket that differs makes the integers that
  changed symbolic, so one compile serves every later bucket but for the
  special cases of 1 (a batch or a width of one), a handful in all rather than
  one per bucket. On a CPU this is the proof that the forward is one graph with no
  host read: a graph break fails the compile, and so does any operation whose
  result depends on tensor data the host would have to wait for (`.item()`,
  `.tolist()`, `nonzero`, boolean masks: torch traces these as unbacked
  symbols rather than breaking) or a tensor built from Python data
  (`host_reads`);
- `cuda`: each bucket is captured once as a CUDA graph on first use and
  replayed: a step costs one host-to-device copy of the packed integers, one
  replay and the row selection, instead of one launch per operation;
- `cuda-compiled`: both, the compiled forward captured. A graph still runs
  every kernel the eager forward launches, and at batch 1 a layer's thirty-odd
  small ones (its norms in float32, the rotary embedding, the activation, the
  residual adds) cost microseconds each next to its few weight reads; the
  compiler fuses them into a handful. A compile (tens of seconds for a 7B
  model) happens for a bucket whose integers no compile covers yet, in
  `warm_up` (each 1 among them, a batch or tokens of one, costs one); each
  bucket is then captured once, as in `cuda`.

Table widths. Gathered attention (sdpa) reads every block of the width, so
widths follow the longest context: the next power of two. A paged kernel
reads each request's own length through its table, so there the width only
sizes the table, and one width covers every context up to the longest request
the runner serves (`max_len`, up to TABLE_LIMIT blocks; powers of two past it):
steps then differ by their requests and tokens alone. The price is a table
of B x that width integers packed and copied each step (64 x 257 for a
4,096-token model on 16-token blocks: 130 kB).

`warm_up` compiles or captures every bucket a step can take before the first
request, as a first use while serving would stall every running request for
a capture (or a compile). Graphs share one memory pool, but each keeps its
logits, [B x q, vocab] of the model's dtype: with 64 requests and 16 tokens
at most, 127 x 31 rows in all, about 250 MB for a 32,000-token vocabulary in
bfloat16, per table width.

Steps past the largest bucket (long prefill chunks, very large batches) run
eagerly. The whole padded grid's logits come back; the rows the items asked
for are selected on the device.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from runtime.attention import LAYOUT_KWARG, ForwardItem, PackedStep, StepLayout, StepShape, keep_rows
from runtime.paged_kernels import kernel

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUERY_BUCKETS = (1, 2, 4, 8, 16)
MODES = ("off", "compile", "cuda", "cuda-compiled")
COMPILED = ("compile", "cuda-compiled")
CAPTURED = ("cuda", "cuda-compiled")
TABLE_LIMIT = 1024  # blocks: the widest table a paged step packs for every context (see above)
_PADDING = ForwardItem([], 0, [], 0)


class HostRead(RuntimeError):
    """The compiled forward would wait for the device, or copy Python data to it."""


def host_reads(gm: torch.fx.GraphModule) -> list[str]:
    """The nodes of a traced forward that read device data on the host (values with unbacked
    symbols: sizes or scalars known only once the device has run) or build tensors from
    Python data: what CUDA graph capture refuses, or what would replay stale."""
    return [
        node.format_node()
        for node in gm.graph.nodes
        if getattr(node.target, "__name__", "") in ("tensor", "as_tensor")
        or free_unbacked_symbols(node.meta.get("example_value"))
    ]


def _inductor_without_host_reads(gm: torch.fx.GraphModule, example_inputs):
    if found := host_reads(gm):
        raise HostRead(
            "the forward reads device data on the host or builds tensors from Python data: " + "; ".join(found)
        )
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    packed: torch.Tensor  # the static input the graph reads
    logits: torch.Tensor  # the static output it writes


class GraphRunner:
    def __init__(self, model, kv, mode: str, max_q: int, paged: str | None = None, max_len: int | None = None):
        """`max_len`: the longest request (tokens) a step may hold, what warm_up covers and, with a
        paged kernel, what one table width is sized for; None: widths follow each step."""
        if mode not in MODES[1:]:
            raise ValueError(f"graph mode must be one of {MODES[1:]}, got {mode!r}")
        if mode in CAPTURED and kv.k[0].device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.kv, self.mode, self.paged = model, kv, mode, paged
        self.max_q = min(max_q, QUERY_BUCKETS[-1])
        self.max_blocks = kv.num_blocks  # a table never needs more blocks than the cache has
        self.max_need, self.min_blocks = None, 1  # the widest table a step needs; the narrowest packed
        if max_len:
            # With a paged kernel a padded request reads up to max_q tokens past its context
            # (runtime.paged_kernels); gathered attention reads its real tokens' blocks only.
            read = max_len + (self.max_q if paged else 0)
            self.max_need = min(-(-read // kv.block_size), self.max_blocks)
            if paged:
                self.min_blocks = min(self.max_need, TABLE_LIMIT)
        if paged:
            kernel(paged)  # looked up here, outside any traced forward
        self._compiled = None  # torch.compile of _padded_forward, made on first use
        self._captured: dict[StepShape, _Captured] = {}
        self._pool = None
        self.steps = 0  # steps run through a graph (the rest ran eagerly)

    def bucket(self, items: list[ForwardItem]) -> tuple[int, int, int] | None:
        """(requests, tokens per request, table blocks) of the padded step, or None: run eagerly."""
        b = bisect.bisect_left(BATCH_BUCKETS, len(items))
        q = bisect.bisect_left(QUERY_BUCKETS, max(len(it.token_ids) for it in items))
        if b == len(BATCH_BUCKETS) or q == len(QUERY_BUCKETS) or QUERY_BUCKETS[q] > self.max_q:
            return None
        # A paged kernel reads ctx + width cached tokens (runtime.paged_kernels): the table covers them.
        need = max(
            -(-(it.ctx + (QUERY_BUCKETS[q] if self.paged else len(it.token_ids))) // self.kv.block_size) for it in items
        )
        if need > self.max_blocks:  # only near a full cache, for a paged kernel's padding reads
            return None
        return BATCH_BUCKETS[b], QUERY_BUCKETS[q], self._width(need)

    def _width(self, need: int) -> int:
        """The table width of a step whose requests read at most `need` blocks."""
        blocks = self.min_blocks if need <= self.min_blocks else 1 << max(need - 1, 0).bit_length()
        return min(blocks, self.max_blocks)

    def buckets(self, max_batch: int) -> list[tuple[int, int, int]]:
        """Every bucket a step of up to `max_batch` requests within max_len can take, in the order
        warm_up takes them: largest first, as graphs captured later fit in the pool memory the
        larger ones freed; and the second differs from the first in each integer that varies,
        so that one compile makes them all symbolic (one at a time, a compile each)."""
        if self.max_need is None:
            raise ValueError("the buckets of a runner without max_len are unbounded")
        batches = BATCH_BUCKETS[: bisect.bisect_left(BATCH_BUCKETS, max_batch) + 1]
        qs = [q for q in QUERY_BUCKETS if q <= self.max_q]
        widths = sorted({self._width(n) for n in range(1, self.max_need + 1)})
        order = sorted(itertools.product(batches, qs, widths), reverse=True)
        second = tuple(sizes[-2] if len(sizes) > 1 else sizes[-1] for sizes in (batches, qs, widths))
        return list(dict.fromkeys([order[0], second, *order]))

    def warm_up(self, max_batch: int) -> int:
        """Compiles or captures each of `buckets(max_batch)` with a step of padding only (its
        writes go to the sink block); returns how many."""
        buckets = self.buckets(max_batch)
        for bucket in buckets:
            self._run(self._pack([], bucket), bucket)
        return len(buckets)

    def forward(self, items: list[ForwardItem], bucket: tuple[int, int, int]) -> torch.Tensor:
        """[sum(num_logits), vocab] logits of the items, through the bucket's graph."""
        self.steps += 1
        step = self._pack(items, bucket)
        packed, logits = self._run(step, bucket)
        return logits[keep_rows(packed, step.shape, sum(it.num_logits for it in items))]

    def _pack(self, items: list[ForwardItem], bucket: tuple[int, int, int]) -> PackedStep:
        batch, q, blocks = bucket
        padded = items + [_PADDING] * (batch - len(items))
        return PackedStep.build(padded, self.kv.block_size, self.kv.pad_block, q, [q] * batch, blocks)

    def _run(self, step: PackedStep, bucket: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the packed integers on the device, the padded grid's logits)."""
        if self.mode == "compile":
            packed = step.to(self.kv.k[0].device)
            return packed, self._step_fn()(packed, *bucket)
        captured = self._captured.get(step.shape) or self._capture(step, bucket)
        captured.packed.copy_(step.host.pin_memory(), non_blocking=True)
        captured.graph.replay()
        return captured.packed, captured.logits

    def _step_fn(self):
        """The bucket's forward as it runs (compiled in a compiled mode)."""
        if self.mode not in COMPILED:
            return self._padded_forward
        if self._compiled is None:
            compiled = torch.compile(
                self._padded_forward, fullgraph=True, dynamic=None, backend=_inductor_without_host_reads
            )

            def run(*args):
                # A few specialisations (see above), more than torch's default limit of 8 allows
                # where three integers vary; past the limit a full-graph compile fails. The
                # setting is per thread: set it on the one that compiles.
                with torch._dynamo.config.patch(cache_size_limit=64):
                    return compiled(*args)

            self._compiled = run
        return self._compiled

    def _padded_forward(self, packed: torch.Tensor, batch: int, q: int, blocks: int) -> torch.Tensor:
        layout = StepLayout.derive(packed, StepShape.padded(batch, q, blocks), self.kv, paged=self.paged)
        out = self.model(
            input_ids=layout.input_ids,
            position_ids=layout.positions,
            use_cache=False,
            logits_to_keep=0,
            **{LAYOUT_KWARG: layout},
        )
        return out.logits[0]

    def _capture(self, step: PackedStep, bucket: tuple[int, int, int]) -> _Captured:
        """Warms the shape up on a side stream (lazy initialisation, a compile and its kernels'
        tuning stay out of the graph), then captures it; all graphs share one memory pool, as
        only one replays at a time."""
        packed = step.to(self.kv.k[0].device)
        forward = self._step_fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward(packed, *bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = forward(packed, *bucket)
        self._pool = graph.pool()
        self._captured[step.shape] = captured = _Captured(graph, packed, logits)
        return captured
