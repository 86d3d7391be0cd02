"""The model phase of a step: the target's forward over the scheduled batch, then token selection.

`ModelExecutor` is what the engine runs on the model thread. The simulator's executor
stands in its place there (`simulator/model.py`): both give `execute(sched)` -> (per
scheduled item its `Verified` tokens, or None for a prefill chunk; sampling time in ms)
and the limits the engine checks requests against: `vocab_size`, `max_len`,
`eos_token_ids`; `runner` is the model runner, or None without a model.
"""

from __future__ import annotations

import time

from engine.config import EngineConfig
from engine.scheduler import SchedulerOutput
from runtime.model_runner import ForwardItem, ModelRunner
from runtime.rejection import SampleRequest, Verified, verify


class ModelExecutor:
    def __init__(self, model, tokenizer, config: EngineConfig):
        cache = config.cache
        self.max_len = getattr(model.config, "max_position_embeddings", None) or cache.kv_cache_tokens
        self.runner = ModelRunner(
            model,
            cache.num_blocks,
            cache.block_size,
            graphs=config.graphs,
            attention=config.attention,
            max_len=config.max_model_len(self.max_len),
        )
        self.vocab_size = model.config.vocab_size
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def execute(self, sched: SchedulerOutput) -> tuple[list[Verified | None], float]:
        """Forward pass, then per item that samples its emitted tokens (None for a prefill chunk);
        and the sampling time (ms). Runs on the model thread: touches no scheduler state."""
        fwd = []
        for it in sched.items:
            seq = it.seq
            ids = seq.token_slice(seq.num_computed, seq.num_computed + it.num_new)
            drafted = it.draft.token_ids if it.draft else []
            fwd.append(
                ForwardItem(ids + drafted, seq.num_computed, seq.block_table, 1 + len(drafted) if it.sample else 0)
            )
        logits = self.runner.forward(fwd)
        start = time.perf_counter()
        results = self.sample(sched, logits)
        return results, (time.perf_counter() - start) * 1e3

    def sample(self, sched: SchedulerOutput, logits) -> list[Verified | None]:
        """Plain decoding and speculating items alike, through one batched rejection sampler."""
        sampling = [it for it in sched.items if it.sample]
        requests = [SampleRequest(it.seq.params, it.draft, it.seq.seed, len(it.seq.output_ids)) for it in sampling]
        verified = iter(verify(logits, requests))
        return [next(verified) if it.sample else None for it in sched.items]
