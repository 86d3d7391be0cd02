"""A paged varlen attention kernel in Triton, for torch builds without a paged flash kernel.

The same contract as torch's paged varlen kernel (`runtime.paged_kernels`, the step's
`PagedStep`): queries are the step's flat tokens, request i's between cu_seq_q[i] and
cu_seq_q[i + 1]; request i reads the first seqused_k[i] cached tokens through its block
table, one page at a time, with a causal mask aligned to the end of both and grouped KV
heads. No gather, no mask tensor: each program takes BLOCK_M queries of one request and
one head and runs an online softmax over the pages it may see.

Written for decode and verification steps (a few queries a request over a long cached
context) on GPUs whose torch has no `varlen_attn(block_table=...)`; it runs under Triton's
interpreter on a CPU (TRITON_INTERPRET=1), which is how the suite checks it.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: `available()` says so, and nothing below is defined
    triton = None

BLOCK_M = 16  # queries a program takes: a verification step's width fits one block


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _paged_attention(
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        cu_seq_q,
        seqused_k,
        table_ptr,
        scale,
        stride_qt,
        stride_qh,
        stride_kp,
        stride_ks,
        stride_kh,
        stride_ot,
        stride_oh,
        stride_table,
        GROUP: tl.constexpr,  # query heads per KV head
        PAGE: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        m_block, req, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_start = tl.load(cu_seq_q + req)
        n_q = tl.load(cu_seq_q + req + 1) - q_start
        if m_block * BLOCK < n_q:
            used = tl.load(seqused_k + req)
            kv_head = head // GROUP
            rows = m_block * BLOCK + tl.arange(0, BLOCK)
            dims = tl.arange(0, D)
            q = tl.load(
                q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=(rows < n_q)[:, None],
                other=0.0,
            )
            last_seen = rows + used - n_q  # query j sees keys 0 .. j + used - n_q
            m_i = tl.full([BLOCK], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK], tl.float32)
            acc = tl.zeros([BLOCK, D], tl.float32)
            # Pages past the block's last visible key are never read.
            end = tl.minimum(used, m_block * BLOCK + BLOCK - 1 + used - n_q + 1)
            for first in range(0, end, PAGE):
                # 64-bit: a layer's cache can pass 2^31 elements, page x stride would wrap in 32.
                page = tl.load(table_ptr + req * stride_table + first // PAGE).to(tl.int64)
                keys_at = first + tl.arange(0, PAGE)
                offsets = (
                    page * stride_kp + tl.arange(0, PAGE)[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
                )
                # Slots past the request's length read as zeros, as in the flash kernel: a masked
                # weight is 0, and 0 x a stale NaN would still be NaN.
                k = tl.load(k_ptr + offsets, mask=(keys_at < used)[:, None], other=0.0)
                v = tl.load(v_ptr + offsets, mask=(keys_at < used)[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k).to(q.dtype), out_dtype=tl.float32) * scale
                visible = (keys_at[None, :] <= last_seen[:, None]) & (keys_at[None, :] < used)
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
                m_i = m_new
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(
                out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=(rows < n_q)[:, None],
            )


def paged_attention(query, k_pages, v_pages, cu_seq_q, cu_seq_k, max_q, max_k, **kw) -> torch.Tensor:
    """query [N, H, D], pages [P, page, H_kv, D] -> [N, H, D]; the arguments of varlen_attn."""
    heads, kv_heads, head_dim = query.shape[1], k_pages.shape[2], query.shape[2]
    out = torch.empty_like(query)
    table = kw["block_table"]
    grid = (triton.cdiv(max_q, BLOCK_M), table.shape[0], heads)
    _paged_attention[grid](
        query,
        k_pages,
        v_pages,
        out,
        cu_seq_q,
        kw["seqused_k"],
        table,
        kw["scale"] if kw.get("scale") is not None else head_dim**-0.5,
        query.stride(0),
        query.stride(1),
        k_pages.stride(0),
        k_pages.stride(1),
        k_pages.stride(2),
        out.stride(0),
        out.stride(1),
        table.stride(0),
        GROUP=heads // kv_heads,
        PAGE=k_pages.shape[1],
        D=head_dim,
        BLOCK=BLOCK_M,
    )
    return out
