"""Paged KV cache: fixed-size blocks, a block table per request, a free list.

`BlockAllocator` is the bookkeeping (pure Python); `KVCache` holds the tensors
the attention function reads and writes. A request's KV lives in the slots
`block_table[i // block_size] * block_size + i % block_size` for token i.
"""

from __future__ import annotations

import torch


class OutOfBlocks(Exception):
    """Not enough free blocks; the scheduler preempts instead of crashing."""


class BlockAllocator:
    """Hands out blocks so that a request's table is mostly runs of consecutive ids.

    Consecutive blocks let attention read a request's KV as a view instead of a
    copy. A table grows into the block right after its last one when that is
    free; otherwise a new run starts in the middle of the largest free extent,
    which leaves room on both sides for the tables around it to keep growing.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._is_free = bytearray(b"\x01") * num_blocks
        self._num_free = num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    def is_free(self, block: int) -> bool:
        return bool(self._is_free[block])

    def usage(self) -> float:
        return 1.0 - self._num_free / self.num_blocks

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks a table needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(block_table, num_tokens) + reserve <= self._num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Appends blocks to `block_table` (in place) until it holds `num_tokens`."""
        need = self.blocks_needed(block_table, num_tokens)
        if need > self._num_free:
            raise OutOfBlocks(f"need {need} blocks, {self._num_free} free")
        for _ in range(need):
            nxt = block_table[-1] + 1 if block_table else self.num_blocks
            block = nxt if nxt < self.num_blocks and self._is_free[nxt] else self._new_run_start()
            self._is_free[block] = 0
            block_table.append(block)
        self._num_free -= need

    def _new_run_start(self) -> int:
        """The middle of the largest free extent (its start when the extent is the whole cache)."""
        best_start, best_len, start = 0, 0, self._is_free.find(1)
        while start >= 0:
            end = self._is_free.find(0, start)
            end = self.num_blocks if end < 0 else end
            if end - start > best_len:
                best_start, best_len = start, end - start
            start = self._is_free.find(1, end)
        if best_len == self.num_blocks:
            return 0
        return best_start + best_len // 2

    def shrink(self, block_table: list[int], num_tokens: int) -> None:
        """Rollback: frees the blocks beyond those holding the first `num_tokens`."""
        keep = -(-num_tokens // self.block_size)
        while len(block_table) > keep:
            self._is_free[block_table.pop()] = 1
            self._num_free += 1

    def free(self, block_table: list[int]) -> None:
        self.shrink(block_table, 0)


def contiguous_runs(block_table: list[int]) -> list[tuple[int, int]]:
    """[(first block, number of blocks)] of the table's runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in block_table:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


class KVCache:
    """Per-layer K and V tensors shaped [num_blocks + 2, block_size, kv_heads, head_dim].

    The two extra blocks belong to no request. Padded block tables point at `pad_block`,
    which nothing writes, so it stays zero. Padding tokens of a padded batch write their K/V
    to `sink_block`, which no table holds, so nothing reads it. Were they one block, a padding
    token of a request whose KV is not finite would write NaN where every padded table
    reads it, and attention's weight 0 for a masked key still gives 0 x NaN = NaN: the
    request's neighbours in the step, and later steps, would fail with it.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_blocks + 2, block_size, kv_heads, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.pad_block, self.sink_block = num_blocks, num_blocks + 1
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """slots: [N]; key/value: [N, kv_heads, head_dim]."""
        kv_heads, head_dim = key.shape[1], key.shape[2]
        self.k[layer].view(-1, kv_heads, head_dim).index_copy_(0, slots, key)
        self.v[layer].view(-1, kv_heads, head_dim).index_copy_(0, slots, value)

    def clear(self, blocks: list[int]) -> None:
        """Zeros these blocks in every layer."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.k[0].device)
        for k, v in zip(self.k, self.v):
            k.index_fill_(0, index, 0.0)
            v.index_fill_(0, index, 0.0)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks: [B, nb] block ids -> K, V as [B, kv_heads, nb * block_size, head_dim] views."""
        b, nb = blocks.shape
        num_blocks, bs, kv_heads, head_dim = self.k[layer].shape
        flat = blocks.reshape(-1)
        # index_select on [num_blocks, bs * H_kv * D] rows is several times faster than
        # advanced indexing on CPU (one memcpy per block).
        k = torch.index_select(self.k[layer].view(num_blocks, -1), 0, flat)
        v = torch.index_select(self.v[layer].view(num_blocks, -1), 0, flat)
        k = k.view(b, nb * bs, kv_heads, head_dim).transpose(1, 2)
        v = v.view(b, nb * bs, kv_heads, head_dim).transpose(1, 2)
        return k, v

    def read_runs(self, layer: int, runs: list[tuple[int, int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's first `length` cached tokens -> K, V as [1, kv_heads, length, head_dim].

        A view of the cache when the request's blocks are one run; a copy otherwise.
        """
        k, v = self.k[layer], self.v[layer]
        if len(runs) == 1:
            first, count = runs[0]
            k, v = k[first : first + count], v[first : first + count]
        else:
            k = torch.cat([k[first : first + count] for first, count in runs])
            v = torch.cat([v[first : first + count] for first, count in runs])
        kv_heads, head_dim = k.shape[-2], k.shape[-1]
        k = k.view(-1, kv_heads, head_dim)[:length].transpose(0, 1).unsqueeze(0)
        v = v.view(-1, kv_heads, head_dim)[:length].transpose(0, 1).unsqueeze(0)
        return k, v
