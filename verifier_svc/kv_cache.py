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
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popping from the end reuses recently freed (cache-warm) blocks first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks a table needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(block_table, num_tokens) + reserve <= self.num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Appends blocks to `block_table` (in place) until it holds `num_tokens`."""
        need = self.blocks_needed(block_table, num_tokens)
        if need > self.num_free:
            raise OutOfBlocks(f"need {need} blocks, {self.num_free} free")
        for _ in range(need):
            block_table.append(self._free.pop())

    def shrink(self, block_table: list[int], num_tokens: int) -> None:
        """Rollback: frees the blocks beyond those holding the first `num_tokens`."""
        keep = -(-num_tokens // self.block_size)
        while len(block_table) > keep:
            self._free.append(block_table.pop())

    def free(self, block_table: list[int]) -> None:
        self.shrink(block_table, 0)


class KVCache:
    """Per-layer K and V tensors shaped [num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.block_size = block_size
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
