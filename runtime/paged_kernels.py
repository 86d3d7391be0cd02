"""Attention straight over the paged cache, one kernel call per layer for every request (GPU).

The default attention (`runtime.attention`) gathers every block a request may
read into a dense [B, H_kv, blocks x block_size, D] tensor per layer and masks
it: cheap on a CPU, but on a GPU it moves the cache a step reads twice more
than attention needs. A paged varlen kernel reads the pages itself, so a step's
attention is one call per layer for every request, prefill chunks included,
with no gather and no mask. Two kernels take the same arguments:

- "flash": torch's varlen flash-attention kernel, where the torch build has it
  with a block table (`torch.nn.attention.varlen.varlen_attn(block_table=...)`);
- "triton": `runtime.paged_triton`, this repository's kernel, for builds without.

The arguments (`PagedStep`):

- queries are the step's flat tokens, request i's between cu_seq_q[i] and
  cu_seq_q[i + 1] (its `width`, padding included);
- request i reads the first ctx + width cached tokens through its block table;
  the causal mask is aligned to the end of both, so query j sees keys
  0 .. ctx + j, and a padding query (j >= q) sees stale cache slots whose output
  is never read;
- the cache is already laid out as the kernels' pages: [blocks, block_size,
  H_kv, D] per layer.

Whether a kernel is there, and right, depends on the torch build, Triton and the
block size (some torch builds take only pages of a multiple of 256 tokens):
`unavailable` runs it once on the device against dense attention before a
runner relies on it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PagedStep:
    cu_seq_q: torch.Tensor  # [B + 1] int32, flat token offsets of the requests
    cu_seq_k: torch.Tensor  # [B + 1] int32, offsets of the keys each reads (the kernel's API wants them)
    seqused_k: torch.Tensor  # [B] int32, cached tokens each request reads: ctx + width
    table: torch.Tensor  # [B, blocks] int32
    max_q: int
    max_k: int
    kernel: str  # of KERNELS

    @staticmethod
    def derive(ctx, width, table, max_q: int, block_size: int, kernel: str) -> PagedStep:
        """From the step's per-request tensors on the device (no host synchronisation)."""
        seen = (ctx + width).int()
        return PagedStep(
            cu_seq_q=F.pad(torch.cumsum(width, 0), (1, 0)).int(),
            cu_seq_k=F.pad(torch.cumsum(seen, 0), (1, 0)).int(),
            seqused_k=seen,
            table=table.int().contiguous(),
            max_q=max(max_q, 1),
            max_k=table.shape[1] * block_size,
            kernel=kernel,
        )


KERNELS = ("flash", "triton")


_FOUND: dict[str, object] = {}


def kernel(name: str):
    """The named kernel, or None where this torch (or Triton) has none. Looked up once (runners
    do it before their first forward): a compiled forward then traces a read of a dict, not the
    lookup's imports and signature inspection."""
    if name not in _FOUND:
        _FOUND[name] = _find(name)
    return _FOUND[name]


def _find(name: str):
    if name == "triton":
        from runtime import paged_triton

        return paged_triton.paged_attention if paged_triton.available() else None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if "block_table" in inspect.signature(varlen_attn).parameters else None


def attend(query: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, step: PagedStep, scale) -> torch.Tensor:
    """query: [N, H, D] -> [N, H, D] over the pages [blocks, block_size, H_kv, D]."""
    return kernel(step.kernel)(
        query,  # [N, H, D] with a contiguous last dimension: what both kernels need
        k_pages,
        v_pages,
        step.cu_seq_q,
        step.cu_seq_k,
        step.max_q,
        step.max_k,
        scale=scale,
        window_size=(-1, 0),
        enable_gqa=query.shape[1] != k_pages.shape[2],
        seqused_k=step.seqused_k,
        block_table=step.table,
    )


def unavailable(name: str, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype, device) -> str | None:
    """Why the named kernel cannot serve this cache here (None: it can). Runs it once on a
    small paged batch (a decode, a verification across a block boundary, a first prefill
    chunk) and compares with dense attention."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the paged {name} kernel runs on CUDA devices, not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the paged {name} kernel takes float16 or bfloat16, not {dtype}"
    if kernel(name) is None:
        return {
            "flash": f"torch {torch.__version__} has no paged varlen attention (varlen_attn with block_table)",
            "triton": "Triton is not installed",
        }[name]
    if name == "triton" and not all(n >= 16 and n & (n - 1) == 0 for n in (head_dim, block_size)):
        sizes = f"head dim {head_dim}, block size {block_size}"
        return f"the paged triton kernel needs a head dim and block size that are powers of two from 16 ({sizes})"
    gen = torch.Generator(device="cpu").manual_seed(0)
    spec = [(5, 1), (block_size + 3, 3), (0, 4)]  # (ctx, q) per request
    per_request = [-(-(c + q) // block_size) for c, q in spec]
    blocks = sum(per_request) + 1
    k_pages = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    v_pages = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    order = torch.randperm(blocks, generator=gen).tolist()  # pages out of order, as a real cache holds them
    tables, start = [], 0
    for n in per_request:
        tables.append(order[start : start + n] + [order[-1]] * (max(per_request) - n))
        start += n
    ctx = torch.tensor([c for c, _ in spec], device=device)
    q = torch.tensor([n for _, n in spec], device=device)
    step = PagedStep.derive(ctx, q, torch.tensor(tables, device=device), max(n for _, n in spec), block_size, name)
    query = torch.randn(int(q.sum()), heads, head_dim, generator=gen).to(device, dtype)
    try:
        got = attend(query, k_pages, v_pages, step, head_dim**-0.5).float().cpu()  # errors surface here
    except Exception as e:  # a build's own checks (the page size), a compile error: either way, not here
        return f"the paged {name} kernel refused block size {block_size}: {(str(e).splitlines() or [repr(e)])[0]}"
    want, offset = [], 0
    for (c, n), table in zip(spec, tables):
        keys = k_pages[table].flatten(0, 1)[: c + n].float().transpose(0, 1)  # [H_kv, c + n, D]
        values = v_pages[table].flatten(0, 1)[: c + n].float().transpose(0, 1)
        qs = query[offset : offset + n].float().transpose(0, 1)  # [H, n, D]
        mask = torch.arange(c + n, device=device).view(1, -1) <= torch.arange(c, c + n, device=device).view(-1, 1)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, enable_gqa=True)
        want.append(o.transpose(0, 1))
        offset += n
    err = (got - torch.cat(want).cpu()).abs().max().item()
    if err > 0.05:
        return f"the paged {name} kernel disagreed with dense attention by {err:.3g}"
    return None
