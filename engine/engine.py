"""The engine step: schedule -> plan -> propose -> forward -> verify/sample -> emit.

`step()` is the one step loop: the verifier's serving loop awaits it, and so do
the tests and benchmarks. The proposal is an injected phase (any `Proposer`);
the forward pass and sampling run on the process's model thread
(`runtime.model_thread`), where torch releases the GIL, so an event loop keeps
streaming while the model computes. Scheduler state is touched on the caller's
thread only; aborts that arrive during a step are applied right after it.

A speculating request feeds its pending token plus k draft tokens; the target's
k + 1 rows of logits go through the rejection sampler, the request emits the
accepted drafts plus one token, and the KV of rejected drafts is rolled back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time

from controller.policy import MAX_K, Policy
from controller.step import StepRecord
from engine.config import EngineConfig
from engine.execute import ModelExecutor
from engine.output import FinishReason, RequestOutput, TextStream, emit
from engine.planner import SpecPlanner
from engine.scheduler import Scheduler, SchedulerOutput, Sequence
from runtime import model_thread
from runtime.draft import Draft, DraftRequest, Proposal, Proposer
from runtime.kv_cache import BlockAllocator
from runtime.rejection import Verified
from runtime.sampler import SamplingParams

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        config: EngineConfig = EngineConfig(),
        proposer: Proposer | None = None,
        planner: SpecPlanner | None = None,
        *,
        executor=None,
        clock=None,
    ):
        """Without a proposer nothing speculates. `planner` chooses k per request per step
        (default: one following `config.policy`). `executor` runs the model phase (default:
        `ModelExecutor` over `model`); `clock` replaces the wall clock for timestamps and
        durations (seconds; the simulator's virtual one). No tokenizer: outputs carry no text."""
        self.config = config
        self.proposer = proposer
        self.planner = planner or SpecPlanner(config.policy)
        self.tokenizer = tokenizer
        self.executor = executor if executor is not None else ModelExecutor(model, tokenizer, config)
        self.runner = self.executor.runner
        self._now = clock or time.monotonic  # timestamps: arrivals, first tokens
        self._timer = clock or time.perf_counter  # durations: the step's phases
        cache = config.cache
        self.allocator = BlockAllocator(cache.num_blocks, cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.allocator, clock=self._now)
        self.max_model_len = config.max_model_len(self.executor.max_len)
        self.vocab_size = self.executor.vocab_size
        self.eos_token_ids = self.executor.eos_token_ids
        self._seqs: dict[str, Sequence] = {}
        self._streams: dict[str, TextStream] = {}
        self._stepping = False
        self._deferred_aborts: set[str] = set()
        self._step_ids = itertools.count(1)
        self.last_step: StepRecord | None = None
        self.consecutive_failures = 0  # steps in a row that failed (reset by one that completes)
        if self.runner is not None:  # graphs (if any) compiled and captured before the first request
            self.runner.warm_up(config.scheduler.max_num_seqs)

    # -- requests -----------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        policy: Policy | None = None,
        trace: bool = False,
    ) -> Sequence:
        """Queues a validated request (`policy`: its own speculation, None = the server's; `trace`:
        keep its speculative rounds in `Sequence.rounds`); raises QueueFull or ValueError (duplicate id)."""
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(request_id, list(prompt_ids), params, self._now(), seed=seed, policy=policy)
        seq.rounds = [] if trace else None
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        if self.tokenizer is not None:
            self._streams[request_id] = TextStream(self.tokenizer, params.stop)
        return seq

    def abort(self, request_id: str) -> bool:
        """Drops a request; its KV is freed now, or right after the running step (whose
        proposal and forward use its blocks). False when it is not in flight."""
        if request_id not in self._seqs:
            return False
        if self._stepping:
            self._deferred_aborts.add(request_id)
        else:
            self._finish(self._seqs[request_id])
            self.planner.release(request_id)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    @property
    def num_requests(self) -> int:
        return len(self._seqs)

    def kv_usage(self) -> float:
        return self.allocator.usage()

    # -- the step -----------------------------------------------------------

    async def step(self) -> list[RequestOutput]:
        """One step over the scheduled batch; its record is `last_step` afterwards (None when it
        failed). Failures stay as small as they can be attributed: a request whose own work
        fails (its logits, its output) ends alone with FinishReason.ERROR; a failing forward
        pass or proposal bookkeeping ends the step's requests; a failing schedule ends nothing
        (the step is skipped). None reaches the caller; `consecutive_failures` counts steps in
        a row that failed, for the server to give up on an engine that cannot recover."""
        start = self._timer()
        self.last_step = None
        try:
            sched = self._schedule()
        except Exception:
            log.exception("scheduling failed; skipping this step")
            self.consecutive_failures += 1
            return []
        self._stepping = True
        try:
            proposal, propose_ms = await self._propose(sched)
            forward_start = self._timer()
            if self.runner is not None:  # a model: its work goes to the model thread
                results, sample_ms = await model_thread.run(self.executor.execute, sched)
            else:  # no model (a simulation): a thread hop would only cost time
                results, sample_ms = self.executor.execute(sched)
            verify_ms = (self._timer() - forward_start) * 1e3
        except Exception as exc:  # a bug or device error must not take the server down
            log.exception("engine step failed; dropping its %d requests", len(sched.items))
            self.consecutive_failures += 1
            return self._fail(sched, exc)
        except asyncio.CancelledError:  # the caller is stopping: what was aborted meanwhile goes now
            self._stepping = False
            self._apply_deferred_aborts()
            raise
        finally:
            self._stepping = False
        kv_tokens = sum(it.seq.num_computed + it.num_new for it in sched.items)  # before postprocess moves them
        outputs = self._postprocess(sched, results)
        self.last_step = record = StepRecord(
            step_id=next(self._step_ids),
            batch_size=len(sched.items),
            num_batched_tokens=sum(it.num_new + (len(it.draft.token_ids) if it.draft else 0) for it in sched.items),
            num_prefill_tokens=sum(it.num_new for it in sched.items if it.num_new > 1 or not it.sample),
            num_kv_tokens=kv_tokens,
            num_preempted=len(sched.preempted),
            verify_ms=verify_ms,
            sample_ms=sample_ms,
            propose_ms=propose_ms,
            draft_ms=proposal.draft_ms,
            draft_busy_ms=proposal.draft_ms if proposal.busy_ms is None else proposal.busy_ms,
            proposer_failures=proposal.failures,
            planned_k=tuple(it.k for it in sched.items),
            drafts=tuple(
                (it.seq.request_id, len(it.draft.token_ids), r.num_accepted)
                for it, r in zip(sched.items, results)
                if it.draft
            ),
            emitted_tokens=sum(len(o.token_ids) for o in outputs),
            step_ms=(self._timer() - start) * 1e3,
        )
        if self.proposer is not None:  # without one there is nothing to plan
            try:
                self.planner.observe(record)
            except Exception:  # the planner learns one step less; requests are not at stake
                log.exception("the planner could not learn from step %d", record.step_id)
        # Released after observing, so a request finishing now leaves no acceptance entry behind.
        for out in outputs:
            if out.finish_reason is not None:
                self.planner.release(out.request_id)
        self._apply_deferred_aborts()
        self.consecutive_failures = 0
        return outputs

    def _schedule(self) -> SchedulerOutput:
        sched = self.scheduler.schedule()
        if (
            self.proposer is None
            or not self.planner.speculates
            and not any(it.seq.policy is not None and it.seq.policy.speculates for it in sched.items)
        ):
            return sched
        for item, k in zip(sched.items, self.planner.plan(sched.items)):
            if k > 0 and self.scheduler.reserve_drafts(item, k):
                item.k = k
        return sched

    async def _propose(self, sched: SchedulerOutput) -> tuple[Proposal, float]:
        """Attaches drafts; a proposer problem only means no drafts this step.
        Returns the proposal and the time waited for it (ms)."""
        requests = [
            DraftRequest(it.seq.request_id, it.seq.token_ids(), it.k, it.seq.params) for it in sched.items if it.k > 0
        ]
        if not requests:
            return Proposal(), 0.0
        start = self._timer()
        try:
            proposal = await self.proposer.propose(requests)
            self._attach(sched, proposal.drafts)
        except Exception:
            log.exception("proposer failed; this step runs without drafts")
            proposal = Proposal(failures=1)
        return proposal, (self._timer() - start) * 1e3

    def _attach(self, sched: SchedulerOutput, drafts: list[Draft | None]) -> None:
        """Drafts in the order of the speculating items; None means k = 0 this step."""
        speculating = iter(it for it in sched.items if it.k > 0)
        for item, draft in zip(speculating, drafts):
            if draft is None:
                continue
            # A proposer that offers fewer tokens than asked (no n-gram match) is asked
            # for at most one more next step; a confidence stop is no such limit.
            short = len(draft.token_ids) < item.k and not draft.stopped_early
            item.seq.draft_cap = len(draft.token_ids) + 1 if short else MAX_K
            if draft.token_ids and draft.well_formed(self.vocab_size):
                item.draft = Draft(draft.token_ids[: item.k], draft.probs[: item.k] if draft.probs else None)

    def _postprocess(self, sched: SchedulerOutput, results: list[Verified | None]) -> list[RequestOutput]:
        outputs = []
        now = self._now()
        for it, res in zip(sched.items, results):
            try:
                out = self._advance(it, res, now)
            except Exception as exc:  # this request's bookkeeping or output; the others go on
                log.exception("request %s failed in its own step work; ending it alone", it.seq.request_id)
                out = self._fail_one(it.seq, f"request failed: {exc}")
            if out is not None:
                outputs.append(out)
        return outputs

    def _advance(self, it, res: Verified | None, now: float) -> RequestOutput | None:
        """One item's step: KV bookkeeping, speculation stats, its emitted tokens."""
        seq = it.seq
        if res is not None and res.error:
            if self.runner is not None:  # its KV may hold what made its logits so: not for the next owner
                self.runner.clear_blocks(seq.block_table)
            return self._fail_one(seq, res.error)
        self.scheduler.advance(it)
        if it.k:
            # Drafts beyond the accepted ones wrote KV that is no longer valid.
            seq.num_computed += res.num_accepted if it.draft else 0
            self.scheduler.rollback(seq, seq.num_computed)
            if it.draft:
                seq.num_proposed += len(it.draft.token_ids)
                seq.num_accepted += res.num_accepted
                seq.num_spec_steps += 1
            if seq.rounds is not None:
                drafted = len(it.draft.token_ids) if it.draft else 0
                seq.rounds.append((it.k, drafted, res.num_accepted if it.draft else 0))
        if res is None or seq.request_id in self._deferred_aborts:  # prefill chunk, or aborted meanwhile
            return None
        seq.output_ids.extend(res.token_ids)
        if seq.first_token_time is None:
            seq.first_token_time = now
        out = self._emit(seq, res.token_ids)
        if res.logprobs is not None:  # the tokens a stop or the length limit cut go with theirs
            out.logprobs = res.logprobs[: len(out.token_ids)]
        return out

    def _emit(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        out = emit(seq, new_tokens, self._streams.get(seq.request_id), self.eos_token_ids)
        if out.finish_reason is not None:
            self._finish(seq)
        return out

    def _fail(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        outputs = [self._fail_one(it.seq, f"engine step failed: {exc}") for it in sched.items]
        self._apply_deferred_aborts()
        return [o for o in outputs if o is not None]

    def _fail_one(self, seq: Sequence, error: str) -> RequestOutput | None:
        """Ends one request with FinishReason.ERROR, freeing its KV; None when it is gone already
        or was aborted meanwhile (nobody waits for its output)."""
        if seq.request_id not in self._seqs:
            return None
        self._finish(seq)
        self.planner.release(seq.request_id)
        if seq.request_id in self._deferred_aborts:
            return None
        return RequestOutput(seq.request_id, [], "", FinishReason.ERROR, seq=seq, error=error)

    def _apply_deferred_aborts(self) -> None:
        for request_id in self._deferred_aborts:
            self.abort(request_id)
        self._deferred_aborts.clear()

    def _finish(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        self._streams.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        if self.proposer is not None:
            self.proposer.release([seq.request_id])
