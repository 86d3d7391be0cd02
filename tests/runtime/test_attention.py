from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.attention import LAYOUT_KWARG, ForwardItem, PackedStep, StepLayout, keep_rows, paged_attention
from runtime.kv_cache import KVCache

H, H_KV, D = 4, 2, 8
BS = 4
NUM_BLOCKS = 40
LAYERS = 2


def reference(q, k, v, ctx, scale):
    """q: [H, n, D] at positions ctx..ctx+n-1; k/v: [H_kv, ctx+n, D] -> [n, H, D]."""
    rep = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(rep, dim=0)  # kv head j serves query heads j*rep .. j*rep+rep-1
    v = v.repeat_interleave(rep, dim=0)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale  # [H, n, T]
    n, total = q.shape[1], k.shape[1]
    pos = torch.arange(ctx, ctx + n).view(-1, 1)
    scores = scores.masked_fill(torch.arange(total).view(1, -1) > pos, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.double()
    return out.transpose(0, 1).float()


class Request:
    def __init__(self, gen, table, total):
        self.table = table
        self.q = torch.randn(LAYERS, H, total, D, generator=gen)
        self.k = torch.randn(LAYERS, H_KV, total, D, generator=gen)
        self.v = torch.randn(LAYERS, H_KV, total, D, generator=gen)


def allocate(spec, gen):
    """Non-contiguous block tables: blocks handed out in a shuffled order."""
    order = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    reqs = []
    for ctx, q in spec:
        nb = -(-(ctx + q) // BS)
        table, order = order[:nb], order[nb:]
        reqs.append(Request(gen, table, ctx + q))
    return reqs


def run_step(kv, reqs, chunks, scale, batched_max_q=16):
    """chunks: [(request index, ctx, q)]; one paged_attention call per layer over the
    flattened batch; returns per-layer [1, N, H, D] outputs."""
    items = [ForwardItem([0] * q, ctx, reqs[r].table, 0) for r, ctx, q in chunks]
    layout = StepLayout.build(items, kv, "cpu", batched_max_q)
    outs = []
    for layer in range(LAYERS):
        query = torch.cat([reqs[r].q[layer, :, ctx : ctx + q] for r, ctx, q in chunks], dim=1)[None]
        key = torch.cat([reqs[r].k[layer, :, ctx : ctx + q] for r, ctx, q in chunks], dim=1)[None]
        value = torch.cat([reqs[r].v[layer, :, ctx : ctx + q] for r, ctx, q in chunks], dim=1)[None]
        assert query.shape == (1, H, sum(c[2] for c in chunks), D)
        out, weights = paged_attention(
            SimpleNamespace(layer_idx=layer), query, key, value, None, scaling=scale, **{LAYOUT_KWARG: layout}
        )
        assert weights is None
        assert out.shape == (1, query.shape[2], H, D)
        outs.append(out)
    return layout, outs


def check(outs, reqs, chunks, scale):
    ref_scale = scale if scale is not None else D**-0.5
    for layer, out in enumerate(outs):
        start = 0
        for r, ctx, q in chunks:
            rq = reqs[r]
            want = reference(
                rq.q[layer, :, ctx : ctx + q], rq.k[layer, :, : ctx + q], rq.v[layer, :, : ctx + q], ctx, ref_scale
            )
            torch.testing.assert_close(out[0, start : start + q], want, rtol=1e-5, atol=1e-5)
            start += q


@pytest.mark.parametrize("per_request", [False, True], ids=["batched", "all-spans"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_paged_attention_matches_per_request_reference(scale, per_request):
    gen = torch.Generator().manual_seed(0)
    # (ctx, q) of the checked step; ctx tokens are cached by an earlier call.
    spec = [
        (5, 1),  # decode
        (9, 3),  # verification of 2 drafts, crosses a block boundary
        (0, 20),  # first prefill chunk > 16: "single" path straight from its keys
        (6, 18),  # later prefill chunk > 16: "single" path over cached blocks
        (0, 3),  # short first prefill: batched with ctx 0
        (8, 16),  # exactly batched_max_q: still batched
    ]
    reqs = allocate(spec, gen)
    kv = KVCache(LAYERS, NUM_BLOCKS, BS, H_KV, D, torch.float32, "cpu")

    fill = [(r, 0, ctx) for r, (ctx, _) in enumerate(spec) if ctx > 0]
    max_q = 0 if per_request else 16
    _, outs = run_step(kv, reqs, fill, scale, max_q)
    check(outs, reqs, fill, scale)

    step = [(r, ctx, q) for r, (ctx, q) in enumerate(spec)]
    layout, outs = run_step(kv, reqs, step, scale, max_q)
    if per_request:
        assert layout.batched is None and [s.ctx for s in layout.spans] == [c for c, _ in spec]
    else:
        assert [s.ctx for s in layout.spans] == [0, 6]  # the two long prefill chunks
        assert layout.batched is not None and layout.batched.q_index.shape == (4, 16)
    check(outs, reqs, step, scale)


def test_only_singles_and_only_batched():
    gen = torch.Generator().manual_seed(1)
    reqs = allocate([(0, 17), (0, 2)], gen)
    kv = KVCache(LAYERS, NUM_BLOCKS, BS, H_KV, D, torch.float32, "cpu")
    layout, outs = run_step(kv, reqs, [(0, 0, 17)], None)
    assert layout.batched is None and len(layout.spans) == 1
    check(outs, reqs, [(0, 0, 17)], None)
    layout, outs = run_step(kv, reqs, [(1, 0, 2)], None)
    assert layout.batched is not None and layout.spans == []
    check(outs, reqs, [(1, 0, 2)], None)


@pytest.mark.parametrize("batched_max_q", [16, 0], ids=["batched", "spans"])
def test_decode_steps_one_token_at_a_time(batched_max_q):
    gen = torch.Generator().manual_seed(2)
    reqs = allocate([(0, 11), (0, 7)], gen)
    kv = KVCache(LAYERS, NUM_BLOCKS, BS, H_KV, D, torch.float32, "cpu")
    chunks = [(0, 0, 4), (1, 0, 2)]
    _, outs = run_step(kv, reqs, chunks, None, batched_max_q)
    check(outs, reqs, chunks, None)
    for t in range(5):  # both decode; request 0 continues past its prefill
        chunks = [(0, 4 + t, 1), (1, 2 + t, 1)]
        _, outs = run_step(kv, reqs, chunks, None, batched_max_q)
        check(outs, reqs, chunks, None)


def test_rolled_back_positions_are_overwritten():
    """Verification writes KV for drafts; after rejection the same positions are rewritten."""
    gen = torch.Generator().manual_seed(3)
    reqs = allocate([(6, 4)], gen)
    kv = KVCache(LAYERS, NUM_BLOCKS, BS, H_KV, D, torch.float32, "cpu")
    run_step(kv, reqs, [(0, 0, 6)], None)
    rejected = Request(gen, reqs[0].table, 10)  # different drafts at positions 6..9
    run_step(kv, [rejected], [(0, 6, 4)], None)
    _, outs = run_step(kv, reqs, [(0, 6, 4)], None)
    check(outs, reqs, [(0, 6, 4)], None)


def test_layout_slots_follow_the_block_tables():
    kv = KVCache(1, 16, BS, H_KV, D, torch.float32, "cpu")
    items = [ForwardItem([11, 12, 13], 3, [9, 2], 1), ForwardItem([14, 15], 0, [5], 2)]
    layout = StepLayout.build(items, kv, "cpu")
    # request 0: positions 3, 4, 5 -> block 9 offset 3, block 2 offsets 0, 1
    assert layout.slots.tolist() == [9 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 5 * 4 + 0, 5 * 4 + 1]
    g = layout.batched
    assert layout.input_ids.tolist() == [[11, 12, 13, 14, 15]]
    assert layout.positions.tolist() == [[3, 4, 5, 0, 1]]
    assert layout.keep.tolist() == [2, 3, 4]
    assert g.q_index.tolist() == [[0, 1, 2], [3, 4, 4]]  # the padding query repeats the last real one
    assert g.blocks.tolist() == [[9, 2], [5, kv.pad_block]]
    assert g.out_index.tolist() == [0, 1, 2, 3, 4]
    assert g.token_index is None  # every token is in the group: outputs come out in order
    assert g.mask.shape == (2, 1, 3, 8)
    assert g.mask[0, 0, 0].tolist() == [True] * 4 + [False] * 4
    assert g.mask[1, 0, 1].tolist() == [True, True] + [False] * 6
    assert g.mask[1, 0, 2].tolist() == [True, True] + [False] * 6  # padding: as the last real query


def test_padded_widths_send_padding_to_the_sink_block_and_tables_to_the_pad_block():
    """The padded grid of the compiled path: each request 3 tokens wide, a dummy request added."""
    kv = KVCache(1, 16, BS, H_KV, D, torch.float32, "cpu")
    items = [ForwardItem([11], 5, [7, 8], 1), ForwardItem([12, 13], 2, [4], 2), ForwardItem([], 0, [], 0)]
    layout = StepLayout.build(items, kv, "cpu", widths=[3, 3, 3])
    step = PackedStep.build(items, BS, kv.pad_block, widths=[3, 3, 3], blocks=4)
    assert step.shape.logits is None and layout.keep is None  # every row comes back: a fixed shape
    assert keep_rows(step.host, step.shape, 3).tolist() == [0, 3, 4]
    sink = kv.sink_block * BS
    assert layout.input_ids.tolist() == [[11, 0, 0, 12, 13, 0, 0, 0, 0]]
    assert layout.slots.tolist() == [8 * BS + 1, sink, sink, 4 * BS + 2, 4 * BS + 3] + [sink] * 4
    g = layout.batched
    assert g.q_index.shape == (3, 3) and g.out_index.tolist() == list(range(9))
    assert g.blocks[1, 1:].tolist() == [kv.pad_block] and g.blocks[2].tolist() == [kv.pad_block] * 2
    assert g.mask[2, 0].any(dim=1).all()  # the dummy request's queries see the pad block's zeros: no NaN


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 6), st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=6
    ),
    st.integers(0, 3),
    st.booleans(),
)
def test_packed_host_tensor_lays_out_every_field(spec, extra_blocks, padded):
    """[ctx | q | width | num_logits | group | tables | ids], written out item by item, for any
    mix of contexts, token counts (empty dummy requests included), requests holding more
    blocks than this step reads (reserved for drafts), tables wider than any request needs
    (padded with the pad block) and padded widths."""
    items, start = [], 0
    for ctx, q, logits, ahead in spec:
        held = -(-(ctx + q) // BS) + ahead
        items.append(
            ForwardItem(list(range(100 + start, 100 + start + q)), ctx, list(range(start, start + held)), logits)
        )
        start += held + 1
    qs = [len(it.token_ids) for it in items]
    widths = [max(qs) + 1] * len(items) if padded else None
    need = [-(-(it.ctx + q) // BS) for it, q in zip(items, qs)]
    blocks = max(need) + extra_blocks
    step = PackedStep.build(items, BS, 999, 4, widths, blocks)
    widths = widths or qs
    group = [i for i, w in enumerate(widths) if w <= 4]
    want = [it.ctx for it in items] + qs + widths + [it.num_logits for it in items]
    want += [] if len(group) == len(items) else group
    for it, n in zip(items, need):
        want += it.block_table[:n] + [999] * (blocks - n)
    for it, q, w in zip(items, qs, widths):
        want += it.token_ids + [0] * (w - q)
    assert step.host.dtype == torch.long and step.host.tolist() == want


def test_packing_names_a_table_too_short_or_too_narrow():
    items = [ForwardItem([1, 2], 6, [3, 4], 1), ForwardItem([5], 8, [7, 8], 1)]  # the second reads 3 blocks
    with pytest.raises(ValueError, match="request 1's block table is shorter than the 3 blocks it reads"):
        PackedStep.build(items, BS, 999)
    with pytest.raises(ValueError, match="a 2-block table is narrower than the 3 blocks a request reads"):
        PackedStep.build([items[0], ForwardItem([5], 8, [7, 8, 9], 1)], BS, 999, blocks=2)


def test_spans_read_runs_of_consecutive_blocks():
    kv = KVCache(1, 16, BS, H_KV, D, torch.float32, "cpu")
    items = [ForwardItem([1, 2], 9, [3, 4, 5, 9], 1), ForwardItem([3], 5, [7, 8], 1)]
    layout = StepLayout.build(items, kv, "cpu", batched_max_q=0)
    assert [s.runs for s in layout.spans] == [[(3, 3)], [(7, 2)]]  # block 9 holds no token yet
    assert layout.spans[0].mask.shape == (2, 11) and layout.spans[1].mask is None
