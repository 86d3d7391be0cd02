"""The engine step: schedule -> plan -> propose -> run -> verify/sample -> postprocess.

`step()` runs all of it; the async wrapper calls `schedule()` and
`postprocess()` on its event loop and only `execute()` (the forward pass and
sampling, touching no scheduler state) on a worker thread.

A speculating request feeds its pending token plus k draft tokens; the target's
k + 1 rows of logits go through the rejection sampler, the request emits the
accepted drafts plus one token, and the KV of rejected drafts is rolled back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


from verifier_svc.kv_cache import BlockAllocator
from verifier_svc.model_runner import ForwardItem, ModelRunner
from verifier_svc.output import TextStream
from controller.cost_model import StepSample
from verifier_svc.planner import MAX_K, Policy, SpecMode, SpecPlanner, StepOutcome
from verifier_svc.rejection import Draft, Verified, verify
from verifier_svc.sampler import SamplingParams, make_generator, sample
from verifier_svc.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, Sequence


# (B, q) shapes timed at start-up. Batch 1 is timed densely: CPU kernels step where
# they change kernel or blocking (4 -> 5 rows here), which a sparse grid would smooth over.
CALIBRATION_SHAPES = (*((1, q) for q in (1, 2, 3, 4, 5, 8, 9, 16, 17)),
                      *((b, q) for b in (4, 16) for q in (1, 2, 4, 8)))


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_tokens: int = 65536
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_waiting: int = 256
    max_model_len: int | None = None  # None: the model's context, capped by the cache
    policy: Policy = Policy()

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
class DraftRequest:
    """What a proposer needs to draft for one request."""

    request_id: str
    token_ids: list[int]  # the whole context: prompt + output so far
    k: int
    params: SamplingParams


@dataclass
class StepStats:
    batch_size: int
    num_batched_tokens: int  # tokens fed to the target, drafts included
    num_prefill_tokens: int
    num_kv_tokens: int
    num_preempted: int
    forward_s: float
    sample_s: float
    planned: list[int] = field(default_factory=list)  # k the planner chose, per item
    drafts: list[tuple[str, int, int]] = field(default_factory=list)  # (request id, proposed, accepted)

    def outcome(self, propose_ms: float = 0.0, draft_ms: float = 0.0) -> StepOutcome:
        """The step as the planner learns from it."""
        cost = StepSample(self.batch_size, self.num_batched_tokens, self.num_kv_tokens,
                          (self.forward_s + self.sample_s) * 1e3, max(self.planned, default=0), sum(self.planned),
                          propose_ms, draft_ms)
        return StepOutcome(self.drafts, cost)


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), proposer=None,
                 planner: SpecPlanner | None = None):
        """`proposer`: drafts tokens, `propose(list[DraftRequest]) -> list[Draft]` and
        `release(request_ids)`; without one nothing speculates. `planner` chooses k per
        request per step (default: one following `config.policy`)."""
        self.config = config
        self.proposer = proposer
        self.planner = planner or SpecPlanner(config.policy)
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

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    spec_mode: str = SpecMode.AUTO, spec_k: int = 0) -> Sequence:
        """Queues a validated request; raises QueueFull or ValueError (duplicate id)."""
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        seq = Sequence(request_id, list(prompt_ids), params, generator=make_generator(params),
                       spec_mode=spec_mode, spec_k=spec_k)
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        self._streams[request_id] = TextStream(self.tokenizer, params.stop)
        return seq

    def abort(self, request_id: str) -> bool:
        """Drops a request and frees its KV at once; False when it is not in flight."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self._finish(seq)
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
        requests = self.draft_requests(sched)
        propose_ms = 0.0
        if requests:
            start = time.perf_counter()
            self.attach_drafts(sched, self.proposer.propose(requests))
            propose_ms = (time.perf_counter() - start) * 1e3
        results = self.execute(sched)
        if self.proposer is not None:
            self.planner.observe(self.last_stats.outcome(propose_ms, getattr(self.proposer, "last_draft_ms", 0.0)))
        return self.postprocess(sched, results)

    def schedule(self) -> SchedulerOutput:
        sched = self.scheduler.schedule()
        if self.proposer is None or not self.planner.policy.speculates and not self._overrides(sched):
            return sched
        for item, k in zip(sched.items, self.planner.plan(sched.items)):
            if k > 0 and self.scheduler.reserve_drafts(item, k):
                item.k = k
        return sched

    @staticmethod
    def _overrides(sched: SchedulerOutput) -> bool:
        return any(it.seq.spec_mode == SpecMode.FIXED for it in sched.items)

    def draft_requests(self, sched: SchedulerOutput) -> list[DraftRequest]:
        return [DraftRequest(it.seq.request_id, it.seq.token_ids(), it.k, it.seq.params)
                for it in sched.items if it.k > 0]

    def attach_drafts(self, sched: SchedulerOutput, drafts: list[Draft | None]) -> None:
        """Drafts in the order of draft_requests(); None (proposer failed) means k = 0 this step."""
        speculating = iter(it for it in sched.items if it.k > 0)
        for item, draft in zip(speculating, drafts):
            if draft is None:
                continue
            # A proposer that offers fewer tokens than asked (no n-gram match) is asked
            # for at most one more next step; a confidence stop is no such limit.
            short = len(draft.token_ids) < item.k and not draft.stopped_early
            item.seq.draft_cap = len(draft.token_ids) + 1 if short else MAX_K
            if draft.token_ids and self._well_formed(draft):
                item.draft = Draft(draft.token_ids[: item.k], draft.probs[: item.k] if draft.probs else None)

    def _well_formed(self, draft: Draft) -> bool:
        """A proposer's bug must not reach the target: ids in the vocabulary, one distribution per id."""
        if not all(0 <= t < self.vocab_size for t in draft.token_ids):
            return False
        if draft.probs is None:
            return True
        return len(draft.probs) == len(draft.token_ids) and all(
            len(ids) == len(ps) and all(0 <= i < self.vocab_size for i in ids) for ids, ps in draft.probs)

    def execute(self, sched: SchedulerOutput) -> list[Verified | None]:
        """Forward pass, then per item that samples: its emitted tokens (None for a prefill chunk)."""
        start = time.perf_counter()
        fwd = []
        for it in sched.items:
            seq = it.seq
            ids = seq.token_slice(seq.num_computed, seq.num_computed + it.num_new)
            drafted = it.draft.token_ids if it.draft else []
            fwd.append(ForwardItem(ids + drafted, seq.num_computed, seq.block_table,
                                   1 + len(drafted) if it.sample else 0))
        logits = self.runner.forward(fwd)
        mid = time.perf_counter()
        results = self._sample(sched, logits)
        self.last_stats = StepStats(
            batch_size=len(sched.items),
            num_batched_tokens=sum(len(f.token_ids) for f in fwd),
            num_prefill_tokens=sum(it.num_new for it in sched.items if it.num_new > 1 or not it.sample),
            num_kv_tokens=sum(it.seq.num_computed + it.num_new for it in sched.items),
            num_preempted=len(sched.preempted),
            forward_s=mid - start,
            sample_s=time.perf_counter() - mid,
            planned=[it.k for it in sched.items],
            drafts=[(it.seq.request_id, len(it.draft.token_ids), r.num_accepted)
                    for it, r in zip(sched.items, results) if it.draft],
        )
        return results

    def _sample(self, sched: SchedulerOutput, logits) -> list[Verified | None]:
        """Plain decoding rows sampled as one batch; speculating items through the rejection sampler."""
        results: list[Verified | None] = [None] * len(sched.items)
        plain, plain_rows, row = [], [], 0
        for i, it in enumerate(sched.items):
            if not it.sample:
                continue
            if it.draft:
                k = len(it.draft.token_ids)
                results[i] = verify(logits[row: row + k + 1], it.draft, it.seq.params, it.seq.generator)
                row += k + 1
            else:
                plain.append(i)
                plain_rows.append(row)
                row += 1
        seqs = [sched.items[i].seq for i in plain]
        tokens = sample(logits[plain_rows], [s.params for s in seqs], [s.generator for s in seqs])
        for i, token in zip(plain, tokens):
            results[i] = Verified([token], 0)
        return results

    def postprocess(self, sched: SchedulerOutput, results: list[Verified | None]) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for it, res in zip(sched.items, results):
            self.scheduler.advance(it)
            seq = it.seq
            if it.k:
                # Drafts beyond the accepted ones wrote KV that is no longer valid.
                seq.num_computed += res.num_accepted if it.draft else 0
                self.scheduler.rollback(seq, seq.num_computed)
                if it.draft:
                    seq.num_proposed += len(it.draft.token_ids)
                    seq.num_accepted += res.num_accepted
                    seq.num_spec_steps += 1
            if res is None or seq.request_id not in self._seqs:  # prefill chunk, or aborted meanwhile
                continue
            seq.output_ids.extend(res.token_ids)
            if seq.first_token_time is None:
                seq.first_token_time = now
            outputs.append(self._emit(seq, res.token_ids))
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
            self._finish(seq)
        return out

    def _finish(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        self._streams.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        self.planner.release(seq.request_id)
        if self.proposer is not None:
            self.proposer.release([seq.request_id])

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        return token in seq.params.stop_token_ids or (not seq.params.ignore_eos and token in self.eos_token_ids)

    def calibrate(self, shapes=CALIBRATION_SHAPES, ctx: int = 128) -> list[dict]:
        """Times one forward per (B, q) shape, after a warm-up; rows for controller.profile.
        Run before serving: it uses free blocks. A small cache skips shapes it cannot hold."""
        rows = []
        for b, q in shapes:
            ms = self.time_forward(b, q, ctx, warm_up=True)
            if ms is not None:
                rows.append({"B": b, "q": q, "ctx": ctx, "ms": ms})
        return rows

    def time_forward(self, batch: int, q: int, ctx: int, warm_up: bool = False) -> float | None:
        """Milliseconds of one forward of `batch` requests feeding q tokens each over ctx cached
        ones, on scratch KV blocks (their contents do not matter for timing); None when the
        free blocks cannot hold it."""
        if batch * self.allocator.blocks_needed([], ctx + q) > self.allocator.num_free:
            return None
        tables = [[] for _ in range(batch)]
        for table in tables:
            self.allocator.grow(table, ctx + q)
        try:
            items = [ForwardItem([0] * q, ctx, table, q) for table in tables]
            if warm_up:
                self.runner.forward(items)
            start = time.perf_counter()
            self.runner.forward(items)
            return (time.perf_counter() - start) * 1e3
        finally:
            for table in tables:
                self.allocator.free(table)

    def kv_usage(self) -> float:
        return self.allocator.usage()
