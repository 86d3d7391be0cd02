"""Paged attention over a flattened ragged batch, registered with transformers.

The model runs on ONE sequence of all requests' new tokens ([1, N]); this
function, called once per layer, writes the new K/V into the paged cache and
attends per request. The per-step layout is built once (`StepLayout.build`)
and shared by all layers:

- requests with few new tokens (decode, verification) are padded to
  [B, q_max] queries and attend in ONE masked SDPA call over their gathered
  blocks: a fixed number of kernel launches per layer whatever B is (what a
  GPU needs; on a CPU it measured as fast as a per-request loop over views);
- long prefill chunks attend one by one as spans (padding them would waste
  q_max x B attention), over a view of their consecutive blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from runtime.kv_cache import KVCache, contiguous_runs

ATTN_IMPLEMENTATION = "smartspec_paged"
LAYOUT_KWARG = "smartspec_layout"


@dataclass
class StepItem:
    """One request's new tokens: flat positions follow the previous item's, KV positions start at ctx."""

    ctx: int  # tokens already in the cache before this step
    q: int  # new tokens this step
    block_table: list[int]


@dataclass
class BatchedGroup:
    q_index: torch.Tensor  # [B, q_max] flat token index per padded query (0 for padding)
    blocks: torch.Tensor  # [B, nb_max] block ids (0 for padding)
    mask: torch.Tensor  # [B, 1, q_max, nb_max * block_size] bool, True = attend
    valid: torch.Tensor  # [n] index into the flattened [B * q_max] padded queries
    token_index: torch.Tensor  # [n] flat token index of each valid padded query


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


@dataclass
class StepLayout:
    kv: KVCache
    slots: torch.Tensor  # [N] cache slot of each new token
    batched: BatchedGroup | None
    spans: list[Span]

    @staticmethod
    def build(items: list[StepItem], kv: KVCache, device, batched_max_q: int = 16) -> StepLayout:
        bs = kv.block_size
        slots, starts = [], []
        start = 0
        for it in items:
            for pos in range(it.ctx, it.ctx + it.q):
                slots.append(it.block_table[pos // bs] * bs + pos % bs)
            starts.append(start)
            start += it.q
        in_group = [it.q <= batched_max_q for it in items]
        spans = [_span(it, s, bs, device) for it, s, g in zip(items, starts, in_group) if not g]
        group = [(it, s) for it, s, g in zip(items, starts, in_group) if g]
        batched = _batched([it for it, _ in group], [s for _, s in group], bs, device) if group else None
        return StepLayout(kv, torch.tensor(slots, dtype=torch.long, device=device), batched, spans)


def _causal_mask(ctxs: list[int], qs: list[int], q_max: int, kv_len: int) -> torch.Tensor:
    """[B, q_max, kv_len]: query j of request b sees keys 0..ctx_b + j.

    Padding queries see key 0 only, so no row is fully masked (SDPA would give NaN).
    """
    ctx = torch.tensor(ctxs).view(-1, 1, 1)
    q = torch.tensor(qs).view(-1, 1, 1)
    j = torch.arange(q_max).view(1, -1, 1)
    t = torch.arange(kv_len).view(1, 1, -1)
    mask = (t <= ctx + j) & (j < q)
    mask |= (j >= q) & (t == 0)
    return mask


def _batched(items: list[StepItem], starts: list[int], bs: int, device) -> BatchedGroup:
    q_max = max(it.q for it in items)
    nb = max(-(-(it.ctx + it.q) // bs) for it in items)
    q_index, valid, token_index = [], [], []
    for b, (it, s) in enumerate(zip(items, starts)):
        q_index.append([s + j for j in range(it.q)] + [0] * (q_max - it.q))
        valid.extend(b * q_max + j for j in range(it.q))
        token_index.extend(range(s, s + it.q))
    blocks = [it.block_table[:nb] + [0] * (nb - len(it.block_table[:nb])) for it in items]
    mask = _causal_mask([it.ctx for it in items], [it.q for it in items], q_max, nb * bs)
    return BatchedGroup(
        q_index=torch.tensor(q_index, dtype=torch.long, device=device),
        blocks=torch.tensor(blocks, dtype=torch.long, device=device),
        mask=mask.unsqueeze(1).to(device),
        valid=torch.tensor(valid, dtype=torch.long, device=device),
        token_index=torch.tensor(token_index, dtype=torch.long, device=device),
    )


def _span(it: StepItem, start: int, bs: int, device) -> Span:
    total = it.ctx + it.q
    runs = contiguous_runs(it.block_table[: -(-total // bs)])
    mask = None
    if it.ctx > 0 and it.q > 1:
        mask = _causal_mask([it.ctx], [it.q], it.q, total)[0].to(device)
    return Span(start, start + it.q, it.ctx, runs, mask)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query: [1, H, N, D]; key/value: [1, H_kv, N, D] -> ([1, N, H, D], None)."""
    layout: StepLayout = kwargs[LAYOUT_KWARG]
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [N, H, D]
    layout.kv.write(layer, layout.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    out = query.new_empty(q.shape)
    g = layout.batched
    if g is not None:
        k, v = layout.kv.gather(layer, g.blocks)  # [B, H_kv, K, D]
        qb = q[g.q_index].transpose(1, 2)  # [B, H, q_max, D]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=g.mask, scale=scaling, enable_gqa=True)
        out[g.token_index] = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])[g.valid]
    for span in layout.spans:
        out[span.start : span.end] = span.attend(layout.kv, layer, query, key, value, scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
