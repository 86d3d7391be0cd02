"""The engine step: schedule -> plan -> run -> sample -> postprocess.

`step()` runs all of it; the async wrapper calls `schedule()` and
`postprocess()` on its event loop and only `execute()` (the forward pass and
sampling, touching no scheduler state) on a worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from verifier_svc.kv_cache import BlockAllocator
from verifier_svc.model_runner import ForwardItem, ModelRunner
from verifier_svc.output import TextStream
from verifier_svc.planner import plan
from verifier_svc.sampler import SamplingParams, make_generator, sample
from verifier_svc.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, Sequence


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_tokens: int = 65536
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_waiting: int = 256
    max_model_len: int | None = None  # None: the model's context, capped by the cache
    policy: str = "off"

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_batched_tokens, self.max_waiting)


class FinishReason:
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    matched_stop: str = ""
    seq: Sequence | None = field(default=None, repr=False)


@dataclass
class StepStats:
    batch_size: int
    num_batched_tokens: int
    num_prefill_tokens: int
    num_kv_tokens: int
    num_preempted: int
    forward_s: float
    sample_s: float


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig()):
        self.config = config
        self.tokenizer = tokenizer
        num_blocks = -(-config.kv_cache_tokens // config.block_size)
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        self.scheduler = Scheduler(config.scheduler_config(), self.allocator)
        model_len = getattr(model.config, "max_position_embeddings", None) or config.kv_cache_tokens
        self.max_model_len = min(config.max_model_len or model_len, model_len, num_blocks * config.block_size)
        self.vocab_size = model.config.vocab_size
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._seqs: dict[str, Sequence] = {}
        self._streams: dict[str, TextStream] = {}
        self.last_stats: StepStats | None = None

    # -- requests -----------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queues a validated request; raises QueueFull or ValueError (duplicate id)."""
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        seq = Sequence(request_id, list(prompt_ids), params, generator=make_generator(params))
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        self._streams[request_id] = TextStream(self.tokenizer, params.stop)
        return seq

    def abort(self, request_id: str) -> bool:
        """Drops a request and frees its KV at once; False when it is not in flight."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self._streams.pop(request_id, None)
        self.scheduler.finish(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    @property
    def num_requests(self) -> int:
        return len(self._seqs)

    # -- the step -----------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.schedule()
        return self.postprocess(sched, self.execute(sched))

    def schedule(self) -> SchedulerOutput:
        sched = self.scheduler.schedule()
        for item, k in zip(sched.items, plan(self.config.policy, sched.items)):
            item.k = k
        return sched

    def execute(self, sched: SchedulerOutput) -> list[int]:
        """Forward pass and sampling: one token per item that samples."""
        start = time.perf_counter()
        fwd = []
        for it in sched.items:
            seq = it.seq
            ids = seq.token_ids()[seq.num_computed: seq.num_computed + it.num_new]
            fwd.append(ForwardItem(ids, seq.num_computed, seq.block_table, 1 if it.sample else 0))
        logits = self.runner.forward(fwd)
        mid = time.perf_counter()
        samplers = [it.seq for it in sched.items if it.sample]
        tokens = sample(logits, [s.params for s in samplers], [s.generator for s in samplers])
        self.last_stats = StepStats(
            batch_size=len(sched.items),
            num_batched_tokens=sched.num_batched_tokens,
            num_prefill_tokens=sum(it.num_new for it in sched.items if it.num_new > 1 or not it.sample),
            num_kv_tokens=sum(it.seq.num_computed + it.num_new for it in sched.items),
            num_preempted=len(sched.preempted),
            forward_s=mid - start,
            sample_s=time.perf_counter() - mid,
        )
        return tokens

    def postprocess(self, sched: SchedulerOutput, tokens: list[int]) -> list[RequestOutput]:
        outputs = []
        sampled = iter(tokens)
        now = time.monotonic()
        for it in sched.items:
            self.scheduler.advance(it)
            if not it.sample:
                continue
            seq = it.seq
            token = next(sampled)
            if seq.request_id not in self._seqs:  # aborted while the step ran
                continue
            seq.output_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            outputs.append(self._emit(seq, [token]))
        return outputs

    def _emit(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        """Applies stop tokens, max_new_tokens and stop strings to the tokens just appended."""
        base = len(seq.output_ids) - len(new_tokens)
        reason, matched = None, ""
        for j, token in enumerate(new_tokens):
            if self._is_stop_token(seq, token):
                del seq.output_ids[base + j + 1:]
                reason, matched = FinishReason.STOP, self.tokenizer.decode([token])
                break
        limit = seq.params.max_new_tokens
        if len(seq.output_ids) > limit or (len(seq.output_ids) == limit and reason is None):
            del seq.output_ids[limit:]
            reason, matched = FinishReason.LENGTH, ""
        stream = self._streams[seq.request_id]
        hit = stream.update(seq.output_ids)
        if hit is not None:
            reason, matched = FinishReason.STOP, hit
        out = RequestOutput(seq.request_id, seq.output_ids[base:], stream.delta(final=reason is not None),
                            reason, matched, seq)
        if reason is not None:
            self._seqs.pop(seq.request_id, None)
            self._streams.pop(seq.request_id, None)
            self.scheduler.finish(seq)
        return out

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        return token in seq.params.stop_token_ids or (not seq.params.ignore_eos and token in self.eos_token_ids)

    def kv_usage(self) -> float:
        return self.allocator.usage()
