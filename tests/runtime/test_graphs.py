"""The bucketed forward compiles whole (`torch.compile(fullgraph=True)`) and matches the eager one.

fullgraph=True turns any graph break into an error: a host synchronisation (`.item()`,
`.tolist()`, a data-dependent branch) or a tensor built from Python lists inside the forward
would fail these tests, so they are what keeps the forward capturable as a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from runtime.attention import ForwardItem
from runtime.graphs import BATCH_BUCKETS, QUERY_BUCKETS, GraphRunner
from runtime.model_runner import ModelRunner

BS = 4


V = 12  # the vocabulary of conftest's small-vocab Llama


@pytest.fixture(scope="module")
def tiny_model(small_vocab_dir):
    from runtime.models import load_model

    return load_model(small_vocab_dir)


def prefill(runner: ModelRunner, tables: list[list[int]], lengths: list[int]) -> None:
    gen = torch.Generator().manual_seed(1)
    items = [ForwardItem(torch.randint(V, (n,), generator=gen).tolist(), 0, t, 0) for t, n in zip(tables, lengths) if n]
    if not items:
        return
    with torch.inference_mode():  # as the runner's own steps run: the cache's K/V never require grad
        runner._eager(items)


def runners(model):
    eager = ModelRunner(model, num_blocks=64, block_size=BS)
    compiled = ModelRunner(model, num_blocks=64, block_size=BS, graphs="compile")
    return eager, compiled


CASES = [  # (tokens per request, contexts): buckets of every kind, through one compiled runner
    ([1], [5]),  # batch-1 decode: compiled with its integers as constants
    ([1], [13]),  # a wider table
    ([1, 1], [5, 9]),  # a second request
    ([3, 1, 2], [9, 4, 14]),  # verification of different k, padded to 4 requests x 4 tokens
    ([1] * 5, [3, 7, 1, 12, 6]),  # decode, padded to 8 requests
    ([2], [20]),  # batch-1 verification
    ([5] * 9, [2] * 9),  # 16 requests x 8 tokens
    ([1] * 16, [1] * 16),  # one-block tables
    ([4, 4], [30, 11]),  # 2 x 4, 16-block tables (9 blocks, padded to the next power of two)
    ([1] * 20, [2] * 20),  # 32 requests
    ([2] * 3, [7] * 3),  # 4 x 2
]


def case_items(runners: tuple, qs: list[int], ctxs: list[int], gen) -> list[ForwardItem]:
    """A CASES step: each request's context prefilled by every runner, then its new tokens."""
    sizes = [-(-(c + q) // BS) for q, c in zip(qs, ctxs)]
    tables = [list(range(sum(sizes[:i]), sum(sizes[: i + 1]))) for i in range(len(qs))]
    for r in runners:
        prefill(r, tables, ctxs)
    return [ForwardItem(torch.randint(V, (q,), generator=gen).tolist(), c, t, q) for q, c, t in zip(qs, ctxs, tables)]


def test_compiled_buckets_match_eager_logits_with_a_few_compiles(tiny_model, compiles):
    """Every bucket's compiled forward gives the eager logits (and writes the same KV), and the
    compiles are a handful for all of them: the bucket's integers become symbols once they
    vary, so a new bucket costs a compile only where 1 is special (a batch or width of one)."""
    eager, compiled = runners(tiny_model)
    gen = torch.Generator().manual_seed(2)
    buckets = set()
    for qs, ctxs in CASES:
        items = case_items((eager, compiled), qs, ctxs, gen)
        bucket = compiled.graphs.bucket(items)
        assert bucket is not None and bucket[0] in BATCH_BUCKETS and bucket[1] in QUERY_BUCKETS
        buckets.add(bucket)
        want, got = eager.forward(items), compiled.forward(items)
        assert got.shape == want.shape == (sum(qs), V)
        rel = (got - want).abs().max() / want.abs().max()
        assert rel <= 1e-4, (qs, rel)
        # The KV the compiled step wrote is what the eager one wrote (padding went to the sink block),
        # and the pad block that padded tables read is still zero.
        for layer in range(2):
            assert torch.allclose(compiled.kv.k[layer][:64], eager.kv.k[layer][:64], atol=1e-5)
            assert not compiled.kv.k[layer][compiled.kv.pad_block].any()
    assert len(buckets) == len(CASES) and compiled.graphs.steps == len(CASES)
    # At least a static and a symbolic compile (none would mean the steps ran uncompiled).
    assert 2 <= len(compiles) <= 8, f"{len(compiles)} compiles for {len(buckets)} buckets"


def test_warm_up_compiles_every_bucket_so_serving_compiles_none(tiny_model, compiles):
    """After `warm_up`, steps of any bucket within its bounds (batch, tokens, max_len) find
    their compiled code (a first use while serving would stall every running request), and
    each bucket a step can fill gives the eager forward's logits."""
    eager = ModelRunner(tiny_model, num_blocks=160, block_size=BS)
    warm = ModelRunner(tiny_model, num_blocks=160, block_size=BS, graphs="compile", max_len=40)
    buckets = warm.graphs.buckets(16)
    # 1..16 requests, 1..16 tokens; tables of up to 10 blocks (40 tokens), padded to 16.
    assert {b for b, _, _ in buckets} == {1, 2, 4, 8, 16} and {q for _, q, _ in buckets} == set(QUERY_BUCKETS)
    assert {w for _, _, w in buckets} == {1, 2, 4, 8, 16} and len(buckets) == 5 * 5 * 5
    # On this thread, not the model thread's `warm.warm_up`: dynamo's settings are per thread,
    # and these 9 compiles pass its default limit of 8 unless the runner raises it where it compiles.
    with torch.inference_mode():
        warm.graphs.warm_up(16)
    assert 2 <= len(compiles) <= 9, f"{len(compiles)} compiles for {len(buckets)} buckets"
    warmed = len(compiles)
    gen = torch.Generator().manual_seed(5)
    reached = 0
    for batch, q, width in buckets:  # a step that fills each bucket, where a real one can
        longest = min(width * BS, 40)  # the widest request's context and new tokens
        if longest < q or (width > 1 and -(-longest // BS) <= width // 2):
            continue  # q tokens need more blocks than the width, or no request needs it
        ctxs = [longest - q] + torch.randint(longest - q + 1, (batch - 1,), generator=gen).tolist()
        items = case_items((eager, warm), [q] * batch, ctxs, gen)
        assert warm.graphs.bucket(items) == (batch, q, width)
        want, got = eager.forward(items), warm.forward(items)
        assert ((got - want).abs().max() / want.abs().max()) <= 1e-4, (batch, q, width)
        reached += 1
    assert reached == warm.graphs.steps >= 60 and len(compiles) == warmed, "a step compiled while serving"


def test_a_paged_kernel_takes_one_table_width_up_to_max_len(tiny_model):
    """A paged kernel reads each request's own length: every step up to max_len packs the same
    table width (one graph per batch and tokens); gathered attention's widths follow the need;
    past TABLE_LIMIT blocks, or without max_len, a paged step's widths are powers of two too."""
    from runtime.graphs import TABLE_LIMIT
    from runtime.kv_cache import KVCache

    kv = KVCache(1, 4096, BS, 1, 8, torch.float32, "cpu")
    paged = GraphRunner(tiny_model, kv, "compile", 16, paged="flash", max_len=100)
    gathered = GraphRunner(tiny_model, kv, "compile", 16, max_len=100)

    def step(ctx: int, q: int = 1) -> list[ForwardItem]:
        return [ForwardItem([1] * q, ctx, list(range(-(-(ctx + 16) // BS))), q)]

    assert {paged.bucket(step(c))[2] for c in (0, 7, 50, 99)} == {29}  # (100 + 16) / 4 blocks
    assert [gathered.bucket(step(c))[2] for c in (0, 7, 50, 99)] == [1, 2, 16, 32]
    assert {w for _, _, w in paged.buckets(64)} == {29} and len(paged.buckets(64)) == 7 * 5
    assert {w for _, _, w in gathered.buckets(1)} == {1, 2, 4, 8, 16, 32}  # 100 tokens: 25 blocks
    assert GraphRunner(tiny_model, kv, "compile", 1, paged="flash", max_len=100).buckets(1) == [(1, 1, 26)]
    long = GraphRunner(tiny_model, kv, "compile", 16, paged="flash", max_len=BS * 3000)
    assert long.bucket(step(10))[2] == TABLE_LIMIT and long.bucket(step(BS * TABLE_LIMIT))[2] == 2 * TABLE_LIMIT
    assert {w for _, _, w in long.buckets(1)} == {TABLE_LIMIT, 2 * TABLE_LIMIT, 4096}  # the cache's 4,096 blocks
    assert GraphRunner(tiny_model, kv, "compile", 16, paged="flash").bucket(step(50))[2] == 16
    with pytest.raises(ValueError, match="without max_len"):
        GraphRunner(tiny_model, kv, "compile", 16).buckets(8)


def test_steps_past_the_largest_bucket_run_eagerly(tiny_model):
    _, compiled = runners(tiny_model)
    long = [ForwardItem([1] * (QUERY_BUCKETS[-1] + 1), 0, list(range(8)), 1)]
    assert compiled.graphs.bucket(long) is None
    assert compiled.graphs.bucket([ForwardItem([1], 0, [0], 1)] * (BATCH_BUCKETS[-1] + 1)) is None
    assert compiled.forward(long).shape == (1, V)


HOST_READS = {
    # a device-to-host read guarding a branch: a graph break
    "item-guard": lambda lengths: lengths.sum().item() >= 0 or None,
    # reads torch traces as unbacked symbols instead of breaking the graph: still a host wait
    "item": lambda lengths: lengths + int(lengths.max().item()) * 0,
    "nonzero": lambda lengths: lengths + lengths.nonzero().sum() * 0,
    "mask": lambda lengths: lengths + lengths[lengths > 0].sum() * 0,
    # a tensor from Python data, copied to the device at every replay (or frozen into a graph)
    "python-list": lambda lengths: lengths + torch.tensor([0] * len(lengths)),
}


@pytest.mark.parametrize("read", sorted(HOST_READS))
def test_a_host_read_in_the_forward_fails_the_compile(tiny_model, monkeypatch, read):
    """The check has teeth: any of these slipped into the attention layout fails the compile."""
    import runtime.attention as attention

    real, change = attention._ragged, HOST_READS[read]

    def reading(lengths, total):
        out = change(lengths)
        return real(out if isinstance(out, torch.Tensor) else lengths, total)

    _, compiled = runners(tiny_model)
    monkeypatch.setattr(attention, "_ragged", reading)
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|host|unsupported"):
        compiled.forward([ForwardItem([1], 3, [0, 1], 1)])


def test_cuda_graphs_need_a_cuda_model(tiny_model):
    eager, _ = runners(tiny_model)
    for mode in ("cuda", "cuda-compiled"):
        with pytest.raises(ValueError, match="CUDA"):
            GraphRunner(tiny_model, eager.kv, mode, 16)
    with pytest.raises(ValueError, match="graph mode"):
        GraphRunner(tiny_model, eager.kv, "sometimes", 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; none on the CI machine")
@pytest.mark.parametrize("mode", ["cuda", "cuda-compiled"])
@pytest.mark.parametrize("attention", ["sdpa", "triton", "flash"])
def test_cuda_graph_replays_match_eager_logits_needs_a_gpu(gpu_llama_dir, attention, mode, monkeypatch):
    """Needs a GPU: the captured graphs (of the eager or the compiled forward) replay their
    bucket's forward with new inputs each step, through each attention this device runs (a
    paged kernel in bfloat16 on 16-token pages); buckets of other sizes get graphs of their
    own (compiled: from the symbolic compile), and nothing compiles while a graph captures."""
    import runtime.graphs as graphs
    from runtime.models import load_model
    from runtime.paged_kernels import unavailable

    real = graphs._inductor_without_host_reads

    def not_while_capturing(gm, example_inputs):
        assert not torch.cuda.is_current_stream_capturing(), "a compile ran inside a graph capture"
        return real(gm, example_inputs)

    monkeypatch.setattr(graphs, "_inductor_without_host_reads", not_while_capturing)
    bs, dtype = (BS, "float32") if attention == "sdpa" else (16, "bfloat16")
    model = load_model(gpu_llama_dir, dtype, "cuda")  # head dim 16: what the Triton kernel takes
    if attention != "sdpa" and (why := unavailable(attention, 4, 2, 16, bs, model.dtype, "cuda")):
        pytest.skip(why)
    eager = ModelRunner(model, num_blocks=64, block_size=bs, attention="sdpa")
    runner = ModelRunner(model, num_blocks=64, block_size=bs, graphs=mode, attention=attention)
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(4)]
    for r in (eager, runner):
        prefill(r, tables, [5, 9, 2, 7])
    gen = torch.Generator().manual_seed(3)
    steps = [([1, 2, 1], [5 + step, 9 + step, 2 + step]) for step in range(3)]  # one bucket, new inputs
    steps += [([1], [9]), ([1, 1], [12, 11]), ([4, 3, 1, 2], [13, 14, 6, 9])]  # buckets of other sizes
    buckets = set()
    for qs, ctxs in steps:
        items = [
            ForwardItem(torch.randint(V, (q,), generator=gen).tolist(), c, t, q) for q, c, t in zip(qs, ctxs, tables)
        ]
        buckets.add(runner.graphs.bucket(items))
        want, got = eager.forward(items), runner.forward(items)
        assert ((got - want).abs().max() / want.abs().max()) <= (1e-4 if attention == "sdpa" else 2e-2), (qs, ctxs)
    assert runner.graphs.steps == len(steps) and len(runner.graphs._captured) == len(buckets) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; none on the CI machine")
@pytest.mark.parametrize("mode", ["cuda", "cuda-compiled"])
def test_warm_up_captures_every_bucket_so_serving_captures_none_needs_a_gpu(gpu_llama_dir, mode):
    """Needs a GPU: after `warm_up` every step of its bounds replays a graph captured then (none
    is captured while serving), through the attention a server here would choose."""
    from runtime.models import load_model

    model = load_model(gpu_llama_dir, "bfloat16", "cuda")
    eager = ModelRunner(model, num_blocks=64, block_size=16, attention="sdpa")
    runner = ModelRunner(model, num_blocks=64, block_size=16, graphs=mode, max_len=100)
    runner.warm_up(4)
    captured = len(runner.graphs._captured)
    assert captured == len(runner.graphs.buckets(4))
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(4)]
    for r in (eager, runner):
        prefill(r, tables, [5, 40, 2, 70])
    gen = torch.Generator().manual_seed(4)
    for qs, ctxs in [([1], [5]), ([2, 1], [40, 2]), ([4, 3, 1, 9], [70, 40, 2, 5]), ([1] * 4, [80, 60, 9, 20])]:
        items = [
            ForwardItem(torch.randint(V, (q,), generator=gen).tolist(), c, t, q) for q, c, t in zip(qs, ctxs, tables)
        ]
        want, got = eager.forward(items), runner.forward(items)
        assert ((got - want).abs().max() / want.abs().max()) <= 2e-2, (qs, ctxs)
    assert runner.graphs.steps == 4 and len(runner.graphs._captured) == captured, "a step captured while serving"


def test_placement_chooses_the_runner_graph_mode():
    """Only the device name is read: no GPU is needed to choose the mode a CUDA placement runs."""
    from runtime.models import Placement

    assert Placement().graph_mode() == "off"
    assert Placement(device="cuda").graph_mode() == "cuda"
    assert Placement(device="cuda:1", compile=True).graph_mode() == "cuda-compiled"
    assert Placement(device="cuda", cuda_graphs="off").graph_mode() == "off"
    for refused in (Placement(compile=True), Placement(device="cuda", cuda_graphs="off", compile=True)):
        with pytest.raises(ValueError, match="compile needs CUDA graphs"):
            refused.graph_mode()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Placement(cuda_graphs="on").graph_mode()


def test_a_request_with_nan_kv_does_not_poison_its_neighbours_through_padding(tiny_model):
    """A request whose KV went NaN (a model overflowing in half precision) pads its step: its
    padding tokens attend over that KV and come out NaN. Their K/V must go where no table reads
    (the sink block): were they written where padded tables point, a healthy request in the same
    padded step, and every later step with a padded table, would read 0 x NaN = NaN."""
    runner = ModelRunner(tiny_model, num_blocks=32, block_size=BS, graphs="compile")
    bad, good = list(range(4)), [10, 11]
    prefill(runner, [bad, good], [13, 1])

    def poison(kv):
        for layer in range(len(kv.k)):
            kv.k[layer][bad] = float("nan")
            kv.v[layer][bad] = float("nan")

    poison(runner.kv)
    step = [ForwardItem([4, 5, 6], 1, good, 3), ForwardItem([3], 13, bad, 1)]  # bad padded 1 -> 4 tokens
    assert runner.graphs.bucket(step)[1] == 4
    logits = runner.forward(step)
    assert torch.isfinite(logits[:3]).all() and not torch.isfinite(logits[3]).any()
    runner.kv.clear(bad)  # what the engine does before the blocks serve another request
    later = [ForwardItem([7], 9, [20, 21, 22], 1), ForwardItem([8], 1, [23], 1)]
    reference = ModelRunner(tiny_model, num_blocks=32, block_size=BS)
    for r in (runner, reference):
        prefill(r, [[20, 21, 22], [23]], [9, 1])
    with torch.inference_mode():
        got, want = runner._eager(later), reference._eager(later)  # eager: padded tables, no padding tokens
    assert torch.allclose(got, want, atol=1e-5)
