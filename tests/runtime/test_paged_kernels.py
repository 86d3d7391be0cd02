"""The paged kernels' path: the step's offsets, lengths and tables, and the runner's choice.

torch's paged varlen flash kernel runs on CUDA only, and no GPU exists where the suite
runs. The tests whose names end in `_cpu_standin` put `standin_kernel` in its place: the
kernels' contract written out in float64 (queries between cu_seq_q[i] and cu_seq_q[i + 1],
the first seqused_k[i] keys of request i through its block table, a causal mask aligned to
the end of both, grouped KV heads). They prove what this side controls: that the layout
hands a kernel the right requests, lengths and pages, for the eager step and for the padded
grid of the compiled and graph paths. The kernels themselves are checked where they run:
`paged_kernels.unavailable` compares one with dense attention on the device before a runner
uses it, `benchmarks/gpu_check.py` records that check, and the Triton kernel also runs here
under Triton's interpreter (tests/runtime/test_paged_triton.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from runtime import paged_kernels
from runtime.attention import LAYOUT_KWARG, ForwardItem, PackedStep, StepLayout, paged_attention
from runtime.kv_cache import KVCache
from tests.runtime.test_attention import BS, H_KV, LAYERS, NUM_BLOCKS, D, H, allocate, check, reference, run_step


def standin_kernel(query, k_pages, v_pages, cu_seq_q, cu_seq_k, max_q, max_k, **kw):
    """varlen_attn's contract, for paged keys, in float64 (a CPU stand-in for the CUDA kernel)."""
    assert kw["window_size"] == (-1, 0) and kw["block_table"].dtype == torch.int32
    assert cu_seq_q.dtype == kw["seqused_k"].dtype == torch.int32
    heads, kv_heads = query.shape[1], k_pages.shape[2]
    assert kw["enable_gqa"] == (heads != kv_heads)
    out = torch.zeros_like(query)
    for i, (table, used) in enumerate(zip(kw["block_table"].tolist(), kw["seqused_k"].tolist())):
        start, end = cu_seq_q[i].item(), cu_seq_q[i + 1].item()
        assert end - start <= max_q and used <= max_k == len(table) * k_pages.shape[1]
        keys = k_pages[table].flatten(0, 1)[:used].double().repeat_interleave(heads // kv_heads, dim=1)
        values = v_pages[table].flatten(0, 1)[:used].double().repeat_interleave(heads // kv_heads, dim=1)
        q = query[start:end].double()  # [n, H, D]
        scores = torch.einsum("nhd,thd->hnt", q, keys) * kw["scale"]
        last_seen = torch.arange(end - start).view(-1, 1) + used - (end - start)  # bottom-right aligned
        scores = scores.masked_fill(torch.arange(used).view(1, -1) > last_seen, float("-inf"))
        out[start:end] = torch.einsum("hnt,thd->nhd", torch.softmax(scores, -1), values).to(query.dtype)
    return out


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setattr(paged_kernels, "kernel", lambda name: standin_kernel)


def flash_step(kv, reqs, chunks, scale):
    """run_step of test_attention through the flash layout."""
    original = StepLayout.build
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            StepLayout, "build", lambda items, kv, dev, q=16, widths=None: original(items, kv, dev, paged="flash")
        )
        return run_step(kv, reqs, chunks, scale)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_flash_layout_matches_per_request_reference_cpu_standin(standin, scale):
    """Decode, verification across a block boundary, prefill chunks long and short, first
    and over cached blocks: one kernel call per layer, each request's rows right."""
    gen = torch.Generator().manual_seed(0)
    spec = [(5, 1), (9, 3), (0, 20), (6, 18), (0, 3), (8, 16)]
    reqs = allocate(spec, gen)
    kv = KVCache(LAYERS, NUM_BLOCKS, BS, H_KV, D, torch.float32, "cpu")
    fill = [(r, 0, ctx) for r, (ctx, _) in enumerate(spec) if ctx > 0]
    layout, outs = flash_step(kv, reqs, fill, scale or D**-0.5)
    check(outs, reqs, fill, scale or D**-0.5)
    step = [(r, ctx, q) for r, (ctx, q) in enumerate(spec)]
    layout, outs = flash_step(kv, reqs, step, scale or D**-0.5)
    assert layout.batched is None and layout.spans == []  # nothing gathered, nothing masked on the host
    assert layout.paged.max_q == 20 and layout.paged.cu_seq_q.tolist() == [0, 1, 4, 24, 42, 45, 61]
    assert layout.paged.seqused_k.tolist() == [c + q for c, q in spec]
    check(outs, reqs, step, scale or D**-0.5)


def test_padded_grid_reads_ctx_plus_width_cpu_standin(standin):
    """The graph path's padded step: each request 4 tokens wide, a dummy request added. The
    kernel reads ctx + width keys, so a real query j still sees exactly keys 0 .. ctx + j."""
    gen = torch.Generator().manual_seed(4)
    spec = [(5, 1), (9, 3), (2, 2)]
    reqs = allocate(spec, gen)
    kv = KVCache(LAYERS, NUM_BLOCKS, BS, H_KV, D, torch.float32, "cpu")
    flash_step(kv, reqs, [(r, 0, ctx) for r, (ctx, _) in enumerate(spec)], D**-0.5)
    items = [ForwardItem([0] * q, c, reqs[r].table, q) for r, (c, q) in enumerate(spec)] + [ForwardItem([], 0, [], 0)]
    packed = PackedStep.build(items, BS, kv.pad_block, 4, [4] * 4, blocks=4)
    layout = StepLayout.derive(packed.host, packed.shape, kv, paged="flash")
    assert layout.paged.seqused_k.tolist() == [9, 13, 6, 4] and layout.paged.max_k == 4 * BS
    assert layout.paged.cu_seq_q.tolist() == [0, 4, 8, 12, 16]
    for layer in range(LAYERS):
        query, key, value = torch.zeros(1, H, 16, D), torch.zeros(1, H_KV, 16, D), torch.zeros(1, H_KV, 16, D)
        for i, (c, q) in enumerate(spec):
            query[0, :, 4 * i : 4 * i + q] = reqs[i].q[layer, :, c : c + q]
            key[0, :, 4 * i : 4 * i + q] = reqs[i].k[layer, :, c : c + q]
            value[0, :, 4 * i : 4 * i + q] = reqs[i].v[layer, :, c : c + q]
        out, _ = paged_attention(
            SimpleNamespace(layer_idx=layer), query, key, value, None, scaling=D**-0.5, **{LAYOUT_KWARG: layout}
        )
        for i, (c, q) in enumerate(spec):
            r = reqs[i]
            want = reference(r.q[layer, :, c : c + q], r.k[layer, :, : c + q], r.v[layer, :, : c + q], c, D**-0.5)
            torch.testing.assert_close(out[0, 4 * i : 4 * i + q], want, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_refused_where_it_cannot_run():
    for name in paged_kernels.KERNELS:
        assert "CUDA" in paged_kernels.unavailable(name, 4, 2, 8, 16, torch.bfloat16, "cpu")
        assert "float16 or bfloat16" in paged_kernels.unavailable(name, 4, 2, 8, 16, torch.float32, "cuda")


def test_runner_attention_choice_on_cpu(small_vocab_dir):
    from runtime.model_runner import ModelRunner
    from runtime.models import load_model

    model = load_model(small_vocab_dir)
    assert ModelRunner(model, 8, BS).paged is None  # auto: the gathered path here
    with pytest.raises(ValueError, match="CUDA"):
        ModelRunner(model, 8, BS, attention="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelRunner(model, 8, BS, attention="paged")


def test_runner_steps_through_the_flash_path_cpu_standin(standin, small_vocab_dir, monkeypatch):
    """A model's prefill, decode and verification steps give the same logits through the
    flash layout as through the gathered one."""
    import runtime.model_runner as model_runner
    from runtime.models import load_model

    model = load_model(small_vocab_dir)
    sdpa = model_runner.ModelRunner(model, 16, BS, attention="sdpa")
    monkeypatch.setattr(model_runner, "unavailable", lambda *a: None)
    flash = model_runner.ModelRunner(model, 16, BS, attention="flash")
    assert flash.paged == "flash" and sdpa.paged is None
    gen = torch.Generator().manual_seed(5)
    tables = [[3, 0, 7], [5, 1, 9]]
    steps = [
        [ForwardItem(torch.randint(12, (n,), generator=gen).tolist(), 0, t, 1) for t, n in zip(tables, (6, 9))],
        [ForwardItem([4], 6, tables[0], 1), ForwardItem([2, 8, 5], 9, tables[1], 3)],  # decode + verification
    ]
    for items in steps:
        want, got = sdpa.forward(items), flash.forward(items)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_graph_buckets_cover_what_the_kernel_reads(small_vocab_dir):
    """A padded request makes the kernel read ctx + width keys: its table must reach that far,
    and a step whose padding would run past the cache runs eagerly instead."""
    from runtime.graphs import GraphRunner
    from runtime.model_runner import ModelRunner
    from runtime.models import load_model

    model = load_model(small_vocab_dir)
    kv = ModelRunner(model, 3, BS).kv
    item = [ForwardItem([1, 2, 3], 5, [0, 1], 3)]  # 8 tokens: 2 blocks; padded to 4 wide, 9: 3 blocks
    assert GraphRunner(model, kv, "compile", 16).bucket(item) == (1, 4, 2)
    assert GraphRunner(model, kv, "compile", 16, paged="flash").bucket(item) == (1, 4, 3)
    full = [ForwardItem([1, 2, 3], 9, [0, 1, 2], 3)]  # 12 tokens fill the cache; padded, 13 would not
    assert GraphRunner(model, kv, "compile", 16).bucket(full) == (1, 4, 3)
    assert GraphRunner(model, kv, "compile", 16, paged="flash").bucket(full) is None


def traceable_standin(query, k_pages, v_pages, cu_seq_q, cu_seq_k, max_q, max_k, **kw):
    """The same contract as `standin_kernel` in tensor operations only (no host reads), so a
    forward through it compiles with fullgraph=True as the real kernel's custom op does."""
    n, heads, _ = query.shape
    kv_heads, used, table = k_pages.shape[2], kw["seqused_k"].long(), kw["block_table"].long()
    t = torch.arange(n)
    req = torch.searchsorted(cu_seq_q[1:].long(), t, right=True)  # each token's request
    start, end = cu_seq_q.long()[req], cu_seq_q.long()[req + 1]
    keys = k_pages[table[req]].flatten(1, 2).repeat_interleave(heads // kv_heads, dim=2)  # [n, max_k, H, D]
    values = v_pages[table[req]].flatten(1, 2).repeat_interleave(heads // kv_heads, dim=2)
    s = torch.arange(max_k)
    j = (t - start).clamp(max=max_q - 1)  # a request's queries number at most max_q: the clamp never bites
    last_seen = (j + used[req] - (end - start)).unsqueeze(1)  # bottom-right aligned causal mask
    visible = (s.unsqueeze(0) <= last_seen) & (s.unsqueeze(0) < used[req].unsqueeze(1))  # [n, max_k]
    scores = torch.einsum("nhd,nshd->nhs", query, keys) * kw["scale"]
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    return torch.einsum("nhs,nshd->nhd", torch.softmax(scores, -1), values)


def test_graph_path_through_the_flash_layout_compiles_whole_cpu_standin(small_vocab_dir, monkeypatch):
    """The padded flash step (offsets, lengths, int32 tables, the kernel's lookup) compiles with
    fullgraph=True, so nothing in it synchronises with the host or builds a tensor from Python
    data, and its logits match the eager gathered path's."""
    import runtime.model_runner as model_runner
    from runtime.models import load_model

    def find(name):  # the real lookup, finding the stand-in, done before any trace
        assert not torch.compiler.is_compiling(), "the kernel was looked up inside the compiled forward"
        return traceable_standin

    monkeypatch.setattr(paged_kernels, "_FOUND", {})
    monkeypatch.setattr(paged_kernels, "_find", find)
    model = load_model(small_vocab_dir)
    sdpa = model_runner.ModelRunner(model, 16, BS, attention="sdpa")
    monkeypatch.setattr(model_runner, "unavailable", lambda *a: None)
    compiled = model_runner.ModelRunner(model, 16, BS, graphs="compile", attention="flash")
    tables = [[3, 0, 7], [5, 1, 9], [2, 4, 6]]
    gen = torch.Generator().manual_seed(6)
    prefill = [ForwardItem(torch.randint(12, (n,), generator=gen).tolist(), 0, t, 0) for t, n in zip(tables, (5, 6, 2))]
    for runner in (sdpa, compiled):
        runner.forward(prefill)
    items = [
        ForwardItem([4], 5, tables[0], 1),
        ForwardItem([2, 8, 5], 6, tables[1], 3),
        ForwardItem([9, 3], 2, tables[2], 2),
    ]
    assert compiled.graphs.bucket(items) == (4, 4, 4)  # 3 requests padded to 4, each 4 tokens wide
    want, got = sdpa.forward(items), compiled.forward(items)
    assert compiled.graphs.steps == 2  # the short prefill (padded to 8 wide) and the step
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_warmed_paged_steps_share_one_table_width_and_compile_nothing_more_cpu_standin(
    small_vocab_dir, monkeypatch, compiles
):
    """What a GPU server runs: a paged kernel's graphs warmed up for every batch and token
    count; steps over contexts short and long then use those graphs (one table width for
    all), compile nothing, and match the eager gathered path."""
    import runtime.model_runner as model_runner
    from runtime.models import load_model

    monkeypatch.setattr(paged_kernels, "_FOUND", {"flash": traceable_standin})
    monkeypatch.setattr(model_runner, "unavailable", lambda *a: None)
    model = load_model(small_vocab_dir)
    sdpa = model_runner.ModelRunner(model, 16, BS, attention="sdpa")
    paged = model_runner.ModelRunner(model, 16, BS, graphs="compile", attention="flash", max_len=30)
    assert {w for _, _, w in paged.graphs.buckets(4)} == {12}  # (30 + 16) / 4 blocks, capped by the cache
    paged.warm_up(4)
    warmed = len(compiles)
    assert 2 <= warmed <= 5  # batch and tokens vary (twice symbolic), then a compile for each 1
    tables = [[3, 0, 7, 10, 11], [5, 1, 9, 12, 13], [2, 4, 6, 8, 14]]
    gen = torch.Generator().manual_seed(8)
    ctxs = [1, 13, 4]
    with torch.inference_mode():
        for runner in (sdpa, paged):
            runner._eager([ForwardItem([1 + c % 7] * c, 0, t, 0) for c, t in zip(ctxs, tables)])
    for qs in ([1, 1, 1], [3, 1, 2], [1], [4, 4], [2, 1, 1]):
        items = [
            ForwardItem(torch.randint(12, (q,), generator=gen).tolist(), c, t, q) for q, c, t in zip(qs, ctxs, tables)
        ]
        assert paged.graphs.bucket(items)[2] == 12
        torch.testing.assert_close(paged.forward(items), sdpa.forward(items), rtol=1e-4, atol=1e-4)
        ctxs = [c + q for c, q in zip(ctxs, qs)] + ctxs[len(qs) :]
    assert paged.graphs.steps == 5 and len(compiles) == warmed, "a step compiled while serving"


def test_a_host_read_in_the_flash_layout_fails_the_compile_cpu_standin(small_vocab_dir, monkeypatch):
    """The check has teeth on this path too: the kernel's max_q read from the device (instead
    of the bucket's shape) fails the compile."""
    import runtime.model_runner as model_runner
    from runtime.models import load_model

    monkeypatch.setattr(paged_kernels, "kernel", lambda name: traceable_standin)
    monkeypatch.setattr(model_runner, "unavailable", lambda *a: None)
    real = paged_kernels.PagedStep.derive
    monkeypatch.setattr(
        paged_kernels.PagedStep,
        "derive",
        staticmethod(lambda ctx, width, table, max_q, bs, name: real(ctx, width, table, int(width.max()), bs, name)),
    )
    compiled = model_runner.ModelRunner(load_model(small_vocab_dir), 16, BS, graphs="compile", attention="flash")
    with pytest.raises(Exception, match="reads device data on the host"):
        compiled.forward([ForwardItem([4, 2], 0, [3], 1)])
