"""What an engine is built with: its KV cache, its scheduler's limits and the server's policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.policy import Policy
from engine.scheduler import SchedulerConfig


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(
        default=16,
        metadata={"help": "tokens per KV block (on a GPU some torch builds run the paged flash kernel only at 256)"},
    )
    kv_cache_tokens: int = field(default=65536, metadata={"help": "KV cache capacity in tokens"})

    @property
    def num_blocks(self) -> int:
        return -(-self.kv_cache_tokens // self.block_size)


@dataclass(frozen=True)
class EngineConfig:
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    policy: Policy = Policy()
    graphs: str = "off"  # the model runner's: off | compile | cuda | cuda-compiled (runtime.graphs)
    attention: str = "auto"  # the model runner's: auto | flash | triton | sdpa (runtime.paged_kernels)

    def max_model_len(self, model_len: int) -> int:
        """The longest request (prompt and output) served: the scheduler's cap, the model's
        context (`model_len`) or the cache's capacity, whichever is least."""
        cache = self.cache
        return min(self.scheduler.max_model_len or model_len, model_len, cache.num_blocks * cache.block_size)
