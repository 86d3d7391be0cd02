"""Decode and verification steps run as compiled or captured graphs, one per padded shape.

A step whose requests all feed few tokens (decode, verification) is padded to a
bucket: requests up to the next of BATCH_BUCKETS (dummy requests with no
tokens), tokens per request up to the next of QUERY_BUCKETS, block tables up
to the next power of two. Every tensor shape of the forward then depends on
the bucket's three integers alone, so:

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
  model) happens on first use, of a bucket whose integers no compile covers
  yet; each bucket is then captured once, as in `cuda`.

Steps past the largest bucket (long prefill chunks, very large batches) run
eagerly. The whole padded grid's logits come back; the rows the items asked
for are selected on the device.
"""

from __future__ import annotations

import bisect
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
    def __init__(self, model, kv, mode: str, max_q: int, paged: str | None = None):
        if mode not in MODES[1:]:
            raise ValueError(f"graph mode must be one of {MODES[1:]}, got {mode!r}")
        if mode in CAPTURED and kv.k[0].device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.kv, self.mode, self.paged = model, kv, mode, paged
        self.max_q = min(max_q, QUERY_BUCKETS[-1])
        self.max_blocks = kv.scratch_block  # a table never needs more blocks than the cache has
        if paged:
            kernel(paged)  # looked up here, outside any traced forward
        self._compiled = None  # torch.compile of _padded_forward, made on first use
        self._captured: dict[StepShape, _Captured] = {}
        self._pool = None
        self.steps = 0  # steps run through a graph (the rest ran eagerly)
        if mode in COMPILED:
            # A handful of specialisations (see above); past the limit a step would run eagerly.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

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
        blocks = 1 << max(need - 1, 0).bit_length()
        return BATCH_BUCKETS[b], QUERY_BUCKETS[q], min(blocks, self.max_blocks)

    def forward(self, items: list[ForwardItem], bucket: tuple[int, int, int]) -> torch.Tensor:
        """[sum(num_logits), vocab] logits of the items, through the bucket's graph."""
        batch, q, blocks = bucket
        self.steps += 1
        padded = items + [ForwardItem([], 0, [], 0)] * (batch - len(items))
        step = PackedStep.build(padded, self.kv.block_size, self.kv.scratch_block, q, [q] * batch, blocks)
        if self.mode == "compile":
            packed = step.to(self.kv.k[0].device)
            logits = self._step_fn()(packed, batch, q, blocks)
        else:
            captured = self._captured.get(step.shape) or self._capture(step, bucket)
            captured.packed.copy_(step.host.pin_memory(), non_blocking=True)
            captured.graph.replay()
            packed, logits = captured.packed, captured.logits
        return logits[keep_rows(packed, step.shape, sum(it.num_logits for it in items))]

    def _step_fn(self):
        """The bucket's forward as it runs (compiled in a compiled mode)."""
        if self.mode not in COMPILED:
            return self._padded_forward
        if self._compiled is None:
            self._compiled = torch.compile(
                self._padded_forward, fullgraph=True, dynamic=None, backend=_inductor_without_host_reads
            )
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
