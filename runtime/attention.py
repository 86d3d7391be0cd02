"""Paged attention over a flattened ragged batch, registered with transformers.

The model runs on ONE sequence of all requests' new tokens ([1, N]); this
function, called once per layer, writes the new K/V into the paged cache and
attends per request. The step's layout is built once (`StepLayout.build`) and
shared by all layers: the host packs each request's (context, new tokens,
logits wanted, block table) and the token ids into one integer tensor, copied
to the device once; positions, cache slots, masks and gather indices are
computed there from those lengths, with no per-token Python and no host
synchronisation, so the forward can be compiled whole or captured as a graph.

- requests with few new tokens (decode, verification) are padded to
  [B, q_max] queries and attend in ONE masked SDPA call over their gathered
  blocks: a fixed number of kernel launches per layer whatever B is;
- long prefill chunks attend one by one as spans (padding them would waste
  q_max x B attention), over a view of their consecutive blocks.

On a GPU, a paged kernel (`runtime.paged_kernels`) replaces both with one call
per layer that reads the pages itself (chosen by the model runner).

A request may occupy more flat tokens than it has (`width` > q): the padded
grid the compiled and graph paths use. Padding tokens write their K/V to the
cache's sink block, which no table reads, and their outputs are never read;
tables are padded with its pad block, which stays zero (`KVCache`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from runtime.kv_cache import KVCache, contiguous_runs
from runtime.paged_kernels import PagedStep, attend

ATTN_IMPLEMENTATION = "smartspec_paged"
LAYOUT_KWARG = "smartspec_layout"


@dataclass
class ForwardItem:
    token_ids: list[int]  # new tokens fed this step
    ctx: int  # tokens of this request already in the cache (position of token_ids[0])
    block_table: list[int]  # must already hold ctx + len(token_ids) tokens
    num_logits: int  # trailing positions whose logits are returned (0..len(token_ids))


@dataclass
class BatchedGroup:
    q_index: torch.Tensor  # [B, q_max] flat token index per padded query
    blocks: torch.Tensor  # [B, nb_max] block ids (the pad block for padding)
    mask: torch.Tensor  # [B, 1, q_max, nb_max * block_size] bool, True = attend
    out_index: torch.Tensor  # [n] index into the flattened [B * q_max] outputs, one per group token
    token_index: torch.Tensor | None  # [n] flat token index of each; None when the group is every token


@dataclass
class Span:
    """A request attended on its own: flat tokens [start, end), KV from its block runs."""

    start: int
    end: int
    ctx: int
    runs: list[tuple[int, int]]  # (first block, count) covering ctx + q tokens
    mask: torch.Tensor | None  # [q, ctx + q] bool when ctx > 0 and q > 1, else None

    def attend(self, kv: KVCache, layer: int, query, key, value, scale) -> torch.Tensor:
        """-> [q, H, D]."""
        q = query[:, :, self.start : self.end]  # [1, H, q, D]
        if self.ctx == 0:  # first chunk: its own keys are all there is
            o = F.scaled_dot_product_attention(
                q,
                key[:, :, self.start : self.end],
                value[:, :, self.start : self.end],
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
        else:
            k, v = kv.read_runs(layer, self.runs, self.ctx + self.end - self.start)  # [1, H_kv, L, D]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)


@dataclass(frozen=True)
class StepShape:
    """The Python integers that fix a step's tensor shapes: what a compiled or captured forward
    is specialised on, and so the key of its cache."""

    batch: int
    blocks: int  # block-table width
    tokens: int  # flat tokens, padding included
    logits: int | None  # rows of logits returned; None: every token's (the caller selects)
    group: tuple[int, ...] | None  # requests attended batched; None: all of them
    q_max: int  # the group's padded queries per request
    group_blocks: int
    group_tokens: int

    @staticmethod
    def padded(batch: int, q: int, blocks: int) -> StepShape:
        """The shape of a padded grid (`PackedStep.build` with every width q and a blocks-wide
        table): three integers, which a compiled forward can take as symbols."""
        return StepShape(batch, blocks, batch * q, None, None, q, blocks, batch * q)


@dataclass
class PackedStep:
    """A step as the host prepares it: one integer tensor and the shapes it implies."""

    host: torch.Tensor  # [ctx | q | width | num_logits | group | tables | ids], int64
    shape: StepShape
    spans: list[tuple[ForwardItem, int, int]]  # (item, q, flat start) attended alone

    @staticmethod
    def build(
        items: list[ForwardItem],
        block_size: int,
        pad_block: int,
        batched_max_q: int = 16,
        widths: list[int] | None = None,
        blocks: int | None = None,
    ) -> PackedStep:
        """`widths`: flat tokens per item (default its own count; wider pads it). `blocks`: the
        block-table width (default the widest table needed). Padded steps return every row."""
        qs = [len(it.token_ids) for it in items]
        padded = widths is not None
        widths = widths or qs
        need = [-(-(it.ctx + q) // block_size) for it, q in zip(items, qs)]
        nb = blocks or max(need)
        if nb < max(need):
            raise ValueError(f"a {nb}-block table is narrower than the {max(need)} blocks a request reads")
        group = [i for i, w in enumerate(widths) if w <= batched_max_q]
        everything = len(group) == len(items)
        head = [it.ctx for it in items] + qs + widths + [it.num_logits for it in items] + ([] if everything else group)
        # Padding is filled in place, not built as Python lists, and the real blocks are read in
        # one pass: a step's tables hold up to B x blocks integers.
        host = np.empty(len(head) + len(items) * nb + sum(widths), dtype=np.int64)
        host[: len(head)] = head
        tables = host[len(head) : len(head) + len(items) * nb].reshape(len(items), nb)
        tables.fill(pad_block)
        try:
            flat = np.fromiter(
                itertools.chain.from_iterable(it.block_table[:n] for it, n in zip(items, need)), np.int64, sum(need)
            )
        except ValueError:  # the iterator ran short
            short = next(i for i, (it, n) in enumerate(zip(items, need)) if len(it.block_table) < n)
            raise ValueError(
                f"request {short}'s block table is shorter than the {need[short]} blocks it reads"
            ) from None
        tables[np.arange(nb) < np.array(need)[:, None]] = flat  # row-major: each request's blocks in order
        ids = itertools.chain.from_iterable(it.token_ids + [0] * (w - q) for it, q, w in zip(items, qs, widths))
        host[len(head) + len(items) * nb :] = np.fromiter(ids, np.int64, sum(widths))
        host = torch.from_numpy(host)
        shape = StepShape(
            batch=len(items),
            blocks=nb,
            tokens=sum(widths),
            logits=None if padded else sum(it.num_logits for it in items),
            group=None if everything else tuple(group),
            q_max=max((widths[i] for i in group), default=0),
            group_blocks=nb if padded else max((need[i] for i in group), default=0),
            group_tokens=sum(widths[i] for i in group),
        )
        starts = list(itertools.accumulate(widths, initial=0))
        spans = [(items[i], qs[i], starts[i]) for i in range(len(items)) if widths[i] > batched_max_q]
        return PackedStep(host, shape, spans)

    def to(self, device) -> torch.Tensor:
        """The step's one host-to-device copy."""
        host = self.host.pin_memory() if torch.device(device).type == "cuda" else self.host
        return host.to(device, non_blocking=True)


@dataclass
class StepLayout:
    kv: KVCache
    input_ids: torch.Tensor  # [1, N]
    positions: torch.Tensor  # [1, N]
    keep: torch.Tensor | None  # [K] flat index of each token whose logits are returned; None: all
    slots: torch.Tensor  # [N] cache slot of each new token
    batched: BatchedGroup | None
    spans: list[Span]
    paged: PagedStep | None = None  # set: every request through a paged kernel instead

    @staticmethod
    def build(
        items: list[ForwardItem],
        kv: KVCache,
        device,
        batched_max_q: int = 16,
        widths: list[int] | None = None,
        paged: str | None = None,
    ) -> StepLayout:
        """`paged`: the paged kernel's name (runtime.paged_kernels), or None: gathered SDPA."""
        if paged:  # one kernel call takes every request: no spans
            batched_max_q = max(widths or [len(it.token_ids) for it in items])
        step = PackedStep.build(items, kv.block_size, kv.pad_block, batched_max_q, widths)
        spans = [_span(it, q, start, kv.block_size, device) for it, q, start in step.spans]
        return StepLayout.derive(step.to(device), step.shape, kv, spans, paged)

    @staticmethod
    def derive(
        packed: torch.Tensor, shape: StepShape, kv: KVCache, spans: list[Span] = (), paged: str | None = None
    ) -> StepLayout:
        """Everything else from the packed integers, on their device: positions, slots, the
        logits to keep and the batched group's indices and mask (or the paged kernel's offsets).
        Only tensor operations of shapes fixed by `shape`, so this traces, compiles and
        captures with the model."""
        b, nb, bs = shape.batch, shape.blocks, kv.block_size
        group_len = len(shape.group) if shape.group is not None else 0
        ctx, q, width, num_logits, grp, table, input_ids = packed[: 4 * b + group_len + b * nb + shape.tokens].split(
            [b, b, b, b, group_len, b * nb, shape.tokens]
        )
        table = table.view(b, nb)
        start = torch.cumsum(width, 0) - width
        req, local = _ragged(width, shape.tokens)
        pos = ctx[req] + local
        real = local < q[req]
        block = table[req, torch.div(pos, bs, rounding_mode="floor").clamp(max=nb - 1)]
        slots = torch.where(real, block * bs + pos % bs, kv.sink_block * bs)
        keep = None
        if shape.logits is not None:
            k_req, k_local = _ragged(num_logits, shape.logits)
            keep = start[k_req] + q[k_req] - num_logits[k_req] + k_local
        batched = paged_step = None
        if paged:
            paged_step = PagedStep.derive(ctx, width, table, shape.q_max, bs, paged)
        elif shape.group_tokens:
            rows = (
                (ctx, q, width, start, table)
                if shape.group is None
                else (x[grp] for x in (ctx, q, width, start, table))
            )
            batched = _batched(*rows, shape=shape, bs=bs)
        return StepLayout(kv, input_ids.unsqueeze(0), pos.unsqueeze(0), keep, slots, batched, list(spans), paged_step)


def keep_rows(packed: torch.Tensor, shape: StepShape, num_logits: int) -> torch.Tensor:
    """For a padded step (every row returned): the flat index of each row the items asked for."""
    b = shape.batch
    q, width, wanted = packed[b : 2 * b], packed[2 * b : 3 * b], packed[3 * b : 4 * b]
    row, local = _ragged(wanted, num_logits)
    start = torch.cumsum(width, 0) - width
    return start[row] + q[row] - wanted[row] + local


def _ragged(lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of the given lengths laid end to end: (row, index within row) per element.
    `total` (the lengths' sum, known to the host) keeps the device from synchronising."""
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=total)
    starts = torch.cumsum(lengths, 0) - lengths
    return rows, torch.arange(total, device=lengths.device) - starts[rows]


def _batched(ctx, q, width, start, table, *, shape: StepShape, bs: int) -> BatchedGroup:
    """The padded [B, q_max] queries of the group's requests (all tensors on the device).

    Query j of a request sees keys 0..ctx + j; padding queries (j >= q) repeat its last real
    query, so no row is fully masked (SDPA would give NaN) and none needs a rule of its own.
    """
    j = torch.arange(shape.q_max, device=ctx.device)
    jj = torch.minimum(j, (q - 1).clamp_min(0).unsqueeze(1))  # [B, q_max]
    q_index = start.unsqueeze(1) + torch.minimum(j, (width - 1).unsqueeze(1))
    t = torch.arange(shape.group_blocks * bs, device=ctx.device)
    mask = t.view(1, 1, -1) <= (ctx.unsqueeze(1) + jj).unsqueeze(2)
    row, local = _ragged(width, shape.group_tokens)
    return BatchedGroup(
        q_index=q_index,
        blocks=table[:, : shape.group_blocks],
        mask=mask.unsqueeze(1),
        out_index=row * shape.q_max + local,
        token_index=None if shape.group is None else start[row] + local,
    )


def _span(it: ForwardItem, q: int, start: int, bs: int, device) -> Span:
    total = it.ctx + q
    runs = contiguous_runs(it.block_table[: -(-total // bs)])
    mask = None
    if it.ctx > 0 and q > 1:
        mask = torch.arange(total, device=device).view(1, -1) <= torch.arange(it.ctx, total, device=device).view(-1, 1)
    return Span(start, start + q, it.ctx, runs, mask)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query: [1, H, N, D]; key/value: [1, H_kv, N, D] -> ([1, N, H, D], None)."""
    layout: StepLayout = kwargs[LAYOUT_KWARG]
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [N, H, D]
    layout.kv.write(layer, layout.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    if layout.paged is not None:
        return attend(q, layout.kv.k[layer], layout.kv.v[layer], layout.paged, scaling).unsqueeze(0), None
    g = layout.batched
    out = None
    if g is not None:
        k, v = layout.kv.gather(layer, g.blocks)  # [B, H_kv, K, D]
        qb = q[g.q_index].transpose(1, 2)  # [B, H, q_max, D]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=g.mask, scale=scaling, enable_gqa=True)
        o = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])[g.out_index]
        if g.token_index is None:
            out = o
        else:
            out = query.new_empty(q.shape)
            out[g.token_index] = o
    if out is None:
        out = query.new_empty(q.shape)
    for span in layout.spans:
        out[span.start : span.end] = span.attend(layout.kv, layer, query, key, value, scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
