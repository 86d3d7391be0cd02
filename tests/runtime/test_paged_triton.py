"""The Triton paged attention kernel, run by Triton's interpreter on this CPU.

The interpreter executes the kernel's own code (its loads through the block table, masks,
online softmax and stores) with numpy in place of a GPU, so these tests check the kernel,
not a stand-in; its speed, and Triton's compiler, are the GPU check's business. It is
chosen when a kernel is decorated, so the checks run in a fresh interpreter process with
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from runtime.paged_kernels import PagedStep

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    # (ctx, queries) per request, query heads, KV heads, head dim, page, dtype
    "decode-and-verify": ([(5, 1), (19, 3), (40, 16), (0, 4)], 4, 2, 16, 16, "float32"),
    "prefill-chunks": ([(0, 20), (33, 18), (2, 2)], 4, 4, 32, 16, "float32"),  # two query blocks
    "padded-grid": ([(5, 4), (9, 4), (0, 4), (0, 0)], 4, 1, 16, 32, "float32"),  # and an empty request
    "half": ([(7, 1), (50, 5)], 8, 2, 64, 16, "float16"),
    # slots past each request's length hold NaN, as a block freed by a request that failed might
    "stale-nan": ([(5, 1), (19, 3), (0, 4)], 4, 2, 16, 16, "float32"),
}


def run_case(name: str) -> float:
    """Largest difference from the contract's float64 reference, for one case (in this process)."""
    from runtime import paged_triton
    from tests.runtime.test_paged_kernels import standin_kernel

    spec, heads, kv_heads, head_dim, page, dtype = CASES[name]
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    per = [max(-(-(c + q) // page), 1) for c, q in spec]
    pages = sum(per) + 1
    k = torch.randn(pages, page, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(pages, page, kv_heads, head_dim, generator=gen).to(dtype)
    order, tables, start = torch.randperm(pages, generator=gen).tolist(), [], 0
    for n in per:
        tables.append(order[start : start + n] + [order[-1]] * (max(per) - n))
        start += n
    if name == "stale-nan":
        for (c, n), table in zip(spec, tables):
            for slot in range(c + n, len(table) * page):
                k[table[slot // page], slot % page] = v[table[slot // page], slot % page] = float("nan")
    ctx, q = torch.tensor([c for c, _ in spec]), torch.tensor([n for _, n in spec])
    step = PagedStep.derive(ctx, q, torch.tensor(tables), int(q.max()), page, "triton")
    query = torch.randn(int(q.sum()), heads, head_dim, generator=gen).to(dtype)
    kw = dict(scale=head_dim**-0.5, window_size=(-1, 0), enable_gqa=heads != kv_heads, seqused_k=step.seqused_k)
    args = (query, k, v, step.cu_seq_q, step.cu_seq_k, step.max_q, step.max_k)
    got = paged_triton.paged_attention(*args, **kw, block_table=step.table)
    want = standin_kernel(*(a.double() if a is query else a for a in args), **kw, block_table=step.table)
    return (got.double() - want).abs().max().item()


def test_triton_kernel_matches_the_contract_under_the_interpreter():
    code = (
        "import json; from tests.runtime.test_paged_triton import CASES, run_case; "
        "print(json.dumps({name: run_case(name) for name in CASES}))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(errors) == set(CASES)
    for name, err in errors.items():
        assert err <= (5e-3 if CASES[name][-1] == "float16" else 1e-5), (name, err)
