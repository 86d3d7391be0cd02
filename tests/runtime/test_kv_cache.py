import pytest
import torch

from runtime.kv_cache import BlockAllocator, KVCache, OutOfBlocks, contiguous_runs

# --- BlockAllocator ------------------------------------------------------------


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4)])
def test_allocator_rejects_non_positive_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks, block_size)


def test_new_allocator_is_empty():
    alloc = BlockAllocator(8, 4)
    assert alloc.num_free == 8
    assert alloc.usage() == 0.0


@pytest.mark.parametrize(
    "table_len, num_tokens, expected",
    [
        (0, 0, 0),
        (0, 1, 1),
        (0, 4, 1),
        (0, 5, 2),
        (0, 8, 2),
        (0, 9, 3),
        (2, 8, 0),
        (2, 9, 1),
        (3, 5, 0),  # a table longer than needed needs nothing
    ],
)
def test_blocks_needed(table_len, num_tokens, expected):
    alloc = BlockAllocator(16, 4)
    assert alloc.blocks_needed(list(range(table_len)), num_tokens) == expected


def test_grow_appends_distinct_blocks_in_place():
    alloc = BlockAllocator(8, 4)
    table: list[int] = []
    alloc.grow(table, 1)
    assert len(table) == 1 and alloc.num_free == 7
    alloc.grow(table, 4)  # still fits in the first block
    assert len(table) == 1 and alloc.num_free == 7
    alloc.grow(table, 13)
    assert len(table) == 4 and alloc.num_free == 4
    assert len(set(table)) == 4 and all(0 <= b < 8 for b in table)
    assert alloc.usage() == pytest.approx(0.5)


def test_two_tables_never_share_a_block():
    alloc = BlockAllocator(6, 2)
    a, b = [], []
    alloc.grow(a, 5)
    alloc.grow(b, 6)
    assert not set(a) & set(b)
    assert alloc.num_free == 0
    assert alloc.usage() == 1.0


def test_can_grow_honours_reserve():
    alloc = BlockAllocator(4, 4)
    table: list[int] = []
    assert alloc.can_grow(table, 16)
    assert not alloc.can_grow(table, 17)
    assert alloc.can_grow(table, 12, reserve=1)
    assert not alloc.can_grow(table, 12, reserve=2)


def test_out_of_blocks_leaves_state_untouched():
    alloc = BlockAllocator(3, 4)
    table: list[int] = []
    alloc.grow(table, 8)
    before = list(table)
    with pytest.raises(OutOfBlocks):
        alloc.grow(table, 13)  # needs 2 more, 1 free
    assert table == before
    assert alloc.num_free == 1


def test_shrink_frees_trailing_blocks_only():
    alloc = BlockAllocator(8, 4)
    table: list[int] = []
    alloc.grow(table, 16)
    first_two = table[:2]
    alloc.shrink(table, 5)  # tokens 0..4 live in 2 blocks
    assert table == first_two
    assert alloc.num_free == 6
    alloc.shrink(table, 8)  # exact multiple: still 2 blocks
    assert table == first_two
    alloc.shrink(table, 100)  # shrinking to more than held is a no-op
    assert table == first_two
    assert alloc.num_free == 6


def test_freed_blocks_are_reused():
    alloc = BlockAllocator(4, 4)
    a: list[int] = []
    alloc.grow(a, 16)
    freed = a[2:]
    alloc.shrink(a, 8)
    b: list[int] = []
    alloc.grow(b, 8)
    assert sorted(b) == sorted(freed)


def test_free_returns_everything():
    alloc = BlockAllocator(5, 3)
    a, b = [], []
    alloc.grow(a, 7)
    alloc.grow(b, 6)
    alloc.free(a)
    assert a == [] and alloc.num_free == 3
    alloc.free(b)
    assert b == [] and alloc.num_free == 5 and alloc.usage() == 0.0
    alloc.free(b)  # double free of an empty table is harmless
    assert alloc.num_free == 5


def test_grow_and_free_cycles_keep_the_free_list_consistent():
    alloc = BlockAllocator(10, 2)
    tables = [[] for _ in range(4)]
    for step in range(50):
        t = tables[step % 4]
        n = (step * 7) % 9
        if alloc.can_grow(t, n):
            alloc.grow(t, n)
        else:
            alloc.shrink(t, n // 2)
        held = [b for tab in tables for b in tab]
        assert len(held) == len(set(held))
        assert len(held) + alloc.num_free == 10
    for t in tables:
        alloc.free(t)
    assert alloc.num_free == 10
    assert all(alloc.is_free(b) for b in range(10))


# --- KVCache ---------------------------------------------------------------------


def _slots(table, positions, bs):
    return torch.tensor([table[p // bs] * bs + p % bs for p in positions], dtype=torch.long)


def test_bytes_per_token():
    assert KVCache.bytes_per_token(2, 4, 8, torch.float16) == 2 * 2 * 4 * 8 * 2
    assert KVCache.bytes_per_token(3, 1, 16, torch.float32) == 2 * 3 * 1 * 16 * 4


def test_cache_tensors_have_the_documented_shape():
    kv = KVCache(num_layers=2, num_blocks=5, block_size=4, kv_heads=3, head_dim=8, dtype=torch.float32, device="cpu")
    assert len(kv.k) == len(kv.v) == 2
    assert kv.k[0].shape == (7, 4, 3, 8)  # the pad and sink blocks past the allocator's
    assert (kv.pad_block, kv.sink_block) == (5, 6)
    assert kv.k[0].data_ptr() != kv.k[1].data_ptr()


def test_write_then_gather_with_non_contiguous_tables():
    torch.manual_seed(0)
    bs, h_kv, d = 4, 2, 3
    kv = KVCache(
        num_layers=2, num_blocks=10, block_size=bs, kv_heads=h_kv, head_dim=d, dtype=torch.float32, device="cpu"
    )
    table_a = [7, 2, 9]  # 10 tokens
    table_b = [4, 0]  # 6 tokens
    k_a, v_a = torch.randn(10, h_kv, d), torch.randn(10, h_kv, d)
    k_b, v_b = torch.randn(6, h_kv, d), torch.randn(6, h_kv, d)
    # Write in two chunks (prefill then more), interleaving the requests in one call.
    slots = torch.cat([_slots(table_a, range(0, 6), bs), _slots(table_b, range(0, 6), bs)])
    kv.write(1, slots, torch.cat([k_a[:6], k_b]), torch.cat([v_a[:6], v_b]))
    kv.write(1, _slots(table_a, range(6, 10), bs), k_a[6:], v_a[6:])

    blocks = torch.tensor([table_a, table_b + [0]])  # padded to nb = 3
    k, v = kv.gather(1, blocks)
    assert k.shape == v.shape == (2, h_kv, 12, d)
    torch.testing.assert_close(k[0, :, :10], k_a.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(v[0, :, :10], v_a.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(k[1, :, :6], k_b.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(v[1, :, :6], v_b.transpose(0, 1), rtol=0, atol=0)
    # The raw slot of token i is block_table[i // bs] * bs + i % bs.
    torch.testing.assert_close(kv.k[1][2, 1], k_a[5], rtol=0, atol=0)  # block 2, offset 1
    # Layer 0 was never written.
    assert torch.count_nonzero(kv.k[0]) == 0 and torch.count_nonzero(kv.v[0]) == 0


def test_write_overwrites_rolled_back_slots():
    bs = 2
    kv = KVCache(1, 4, bs, 1, 2, torch.float32, "cpu")
    table = [3, 1]
    kv.write(0, _slots(table, range(4), bs), torch.ones(4, 1, 2), torch.ones(4, 1, 2))
    # Tokens 2..3 rejected; new tokens written at the same positions.
    kv.write(0, _slots(table, [2, 3], bs), torch.full((2, 1, 2), 5.0), torch.full((2, 1, 2), 6.0))
    k, v = kv.gather(0, torch.tensor([table]))
    assert k[0, 0, :, 0].tolist() == [1.0, 1.0, 5.0, 5.0]
    assert v[0, 0, :, 0].tolist() == [1.0, 1.0, 6.0, 6.0]


def test_interleaved_growth_keeps_tables_contiguous():
    """Requests growing in turn (as decode steps do) each stay one run of blocks."""
    alloc = BlockAllocator(256, 4)
    tables = [[] for _ in range(8)]
    for t in tables:
        alloc.grow(t, 6)
    for n in range(7, 60):
        for t in tables:
            alloc.grow(t, n)
    assert all(len(contiguous_runs(t)) == 1 for t in tables)


def test_full_cache_is_still_fully_usable():
    alloc = BlockAllocator(10, 2)
    tables = [[] for _ in range(5)]
    for n in range(1, 5):
        for t in tables:
            alloc.grow(t, n)
    assert alloc.num_free == 0
    assert sorted(b for t in tables for b in t) == list(range(10))


def test_contiguous_runs():
    assert contiguous_runs([]) == []
    assert contiguous_runs([4, 5, 6, 1, 2, 9]) == [(4, 3), (1, 2), (9, 1)]


def test_read_runs_views_one_run_and_copies_several():
    kv = KVCache(1, 8, 2, 1, 3, torch.float32, "cpu")
    kv.k[0].copy_(torch.arange(60, dtype=torch.float32).view(10, 2, 1, 3))
    kv.v[0].copy_(-kv.k[0])
    k, v = kv.read_runs(0, [(2, 2)], 3)
    assert k.shape == (1, 1, 3, 3) and k.data_ptr() == kv.k[0][2].data_ptr()  # a view
    assert torch.equal(k[0, 0], kv.k[0][2:4].reshape(4, 3)[:3]) and torch.equal(v, -k)
    k, _ = kv.read_runs(0, [(5, 1), (1, 1)], 4)
    assert torch.equal(k[0, 0], torch.cat([kv.k[0][5], kv.k[0][1]]).reshape(4, 3))
