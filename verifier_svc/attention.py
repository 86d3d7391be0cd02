"""Paged attention over a flattened ragged batch, registered with transformers.

The model runs on ONE sequence of all requests' new tokens ([1, N]); this
function, called once per layer, writes the new K/V into the paged cache and
attends per request. The per-step layout is built once (`StepLayout.build`)
and shared by all layers, so a layer costs a fixed number of tensor ops:

- "batched" requests (few new tokens: decode, verification) are padded to
  [B, q_max] queries and attend in ONE masked SDPA call over their gathered
  blocks;
- long prefill chunks attend one by one (padding them would waste
  q_max x B attention), the first chunk straight from its own keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from verifier_svc.kv_cache import KVCache

ATTN_IMPLEMENTATION = "smartspec_paged"
LAYOUT_KWARG = "smartspec_layout"


@dataclass
class StepItem:
    """Where one request's new tokens sit: flat [start, start + q), KV positions from ctx."""

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
class SingleItem:
    start: int
    end: int
    blocks: torch.Tensor | None  # [1, nb] when the request has earlier KV, else None
    mask: torch.Tensor | None  # [1, 1, q, nb * block_size] bool


@dataclass
class StepLayout:
    kv: KVCache
    slots: torch.Tensor  # [N] cache slot of each new token
    batched: BatchedGroup | None
    singles: list[SingleItem]

    @staticmethod
    def build(items: list[StepItem], kv: KVCache, device, batched_max_q: int = 16) -> "StepLayout":
        bs = kv.block_size
        slots, starts = [], []
        start = 0
        for it in items:
            for pos in range(it.ctx, it.ctx + it.q):
                slots.append(it.block_table[pos // bs] * bs + pos % bs)
            starts.append(start)
            start += it.q
        group = [i for i, it in enumerate(items) if it.q <= batched_max_q]
        singles = [
            _single(items[i], starts[i], bs, device)
            for i in range(len(items)) if items[i].q > batched_max_q
        ]
        batched = _batched([items[i] for i in group], [starts[i] for i in group], bs, device) if group else None
        return StepLayout(kv, torch.tensor(slots, dtype=torch.long, device=device), batched, singles)


def _causal_mask(ctxs: list[int], qs: list[int], q_max: int, kv_len: int) -> torch.Tensor:
    """[B, 1, q_max, kv_len]: query j of request b sees keys 0..ctx_b + j.

    Padding queries see key 0 only, so no row is fully masked (SDPA would give NaN).
    """
    ctx = torch.tensor(ctxs).view(-1, 1, 1)
    q = torch.tensor(qs).view(-1, 1, 1)
    j = torch.arange(q_max).view(1, -1, 1)
    t = torch.arange(kv_len).view(1, 1, -1)
    mask = (t <= ctx + j) & (j < q)
    mask |= (j >= q) & (t == 0)
    return mask.unsqueeze(1)


def _blocks_tensor(tables: list[list[int]], nb: int) -> torch.Tensor:
    return torch.tensor([t[:nb] + [0] * (nb - len(t[:nb])) for t in tables], dtype=torch.long)


def _batched(items: list[StepItem], starts: list[int], bs: int, device) -> BatchedGroup:
    q_max = max(it.q for it in items)
    nb = max(-(-(it.ctx + it.q) // bs) for it in items)
    q_index, valid, token_index = [], [], []
    for b, (it, s) in enumerate(zip(items, starts)):
        q_index.append([s + j for j in range(it.q)] + [0] * (q_max - it.q))
        valid.extend(b * q_max + j for j in range(it.q))
        token_index.extend(range(s, s + it.q))
    mask = _causal_mask([it.ctx for it in items], [it.q for it in items], q_max, nb * bs)
    return BatchedGroup(
        q_index=torch.tensor(q_index, dtype=torch.long, device=device),
        blocks=_blocks_tensor([it.block_table for it in items], nb).to(device),
        mask=mask.to(device),
        valid=torch.tensor(valid, dtype=torch.long, device=device),
        token_index=torch.tensor(token_index, dtype=torch.long, device=device),
    )


def _single(it: StepItem, start: int, bs: int, device) -> SingleItem:
    if it.ctx == 0:
        return SingleItem(start, start + it.q, None, None)
    nb = -(-(it.ctx + it.q) // bs)
    mask = _causal_mask([it.ctx], [it.q], it.q, nb * bs)
    return SingleItem(start, start + it.q, _blocks_tensor([it.block_table], nb).to(device), mask.to(device))


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
    for s in layout.singles:
        qs = query[:, :, s.start:s.end]  # [1, H, q, D]
        if s.blocks is None:
            o = F.scaled_dot_product_attention(
                qs, key[:, :, s.start:s.end], value[:, :, s.start:s.end],
                is_causal=True, scale=scaling, enable_gqa=True)
        else:
            k, v = layout.kv.gather(layer, s.blocks)
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=s.mask, scale=scaling, enable_gqa=True)
        out[s.start:s.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
