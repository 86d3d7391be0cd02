"""Drives the engine from an asyncio loop.

All scheduler state is touched on the event loop only; the forward pass and
sampling (`Engine.execute`) run on a worker thread, where torch releases the
GIL, so streams keep flowing while the model computes. Aborts that arrive
during a step are applied right after it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass

from verifier_svc.engine import Engine, FinishReason, RequestOutput, StepStats
from verifier_svc.metrics import Metrics
from verifier_svc.planner import SpecMode
from verifier_svc.sampler import SamplingParams

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The step serving this request failed; it was dropped."""


@dataclass
class StepRecord:
    """One finished step, as reported to the controller."""

    step_id: int
    stats: StepStats
    propose_ms: float
    draft_ms: float
    step_ms: float
    emitted_tokens: int


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: Metrics | None = None, keep_steps: int = 4096):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.steps: deque[StepRecord] = deque(maxlen=keep_steps)  # drained by the controller client
        self._step_id = 0
        self._queues: dict[str, asyncio.Queue] = {}
        self._last_emit: dict[str, float] = {}
        self._deferred_aborts: set[str] = set()
        self._in_step = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               spec_mode: str = SpecMode.AUTO, spec_k: int = 0) -> asyncio.Queue:
        """Queues a request; its outputs (RequestOutput or EngineError) arrive on the returned queue."""
        self.engine.add_request(request_id, prompt_ids, params, spec_mode, spec_k)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> None:
        """Stops delivering outputs at once; frees the request's KV now or right after the running step."""
        self._queues.pop(request_id, None)
        self._last_emit.pop(request_id, None)
        if self._in_step:
            self._deferred_aborts.add(request_id)
        else:
            self.engine.abort(request_id)

    def abort_all(self) -> None:
        """Ends every in-flight request with FINISH_REASON_ABORT (shutdown grace exceeded)."""
        for request_id, queue in list(self._queues.items()):
            seq = self.engine.get(request_id)
            if seq is not None:
                queue.put_nowait(RequestOutput(request_id, [], "", FinishReason.ABORT, "", seq))
            self.abort(request_id)

    @property
    def num_requests(self) -> int:
        return self.engine.num_requests

    async def _run(self) -> None:
        while True:
            if not self.engine.has_work():
                self._update_gauges()
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._step()

    async def _step(self) -> None:
        start = time.perf_counter()
        sched = self.engine.schedule()
        self._in_step = True  # aborts wait for the step's end: the proposal and forward use its blocks
        try:
            propose_ms, draft_ms = await self._propose(sched)
            tokens = await asyncio.to_thread(self.engine.execute, sched)
        except Exception as exc:  # a bug or device error must not take the server down
            log.exception("engine step failed; dropping its %d requests", len(sched.items))
            for item in sched.items:
                self._fail(item.seq.request_id, exc)
            return
        finally:
            self._in_step = False
            for request_id in self._deferred_aborts:
                self.engine.abort(request_id)
            self._deferred_aborts.clear()
        outputs = self.engine.postprocess(sched, tokens)
        for out in outputs:
            self._deliver(out)
        end = time.perf_counter()
        self._observe_step(sched, outputs, start, end)
        stats = self.engine.last_stats
        if stats is not None:
            if self.engine.proposer is not None:  # without one there is nothing to plan
                self.engine.planner.observe(stats.outcome(propose_ms, draft_ms))
            self._step_id += 1
            self.steps.append(StepRecord(self._step_id, stats, propose_ms, draft_ms, (end - start) * 1e3,
                                         sum(len(o.token_ids) for o in outputs)))

    async def _propose(self, sched) -> tuple[float, float]:
        """Attaches drafts; a proposer problem only means no drafts this step.
        Returns (proposal time waited, drafting time the proposers reported), in ms."""
        requests = self.engine.draft_requests(sched)
        if not requests:
            return 0.0, 0.0
        start = time.perf_counter()
        try:
            propose = self.engine.proposer.propose
            if inspect.iscoroutinefunction(propose):
                drafts = await propose(requests)
            else:  # in-process: a draft model's forwards must not stall the event loop
                drafts = await asyncio.to_thread(propose, requests)
            self.engine.attach_drafts(sched, drafts)
            self.metrics.proposer_failures.inc(getattr(self.engine.proposer, "last_failures", 0))
        except Exception:
            log.exception("proposer failed; this step runs without drafts")
        elapsed = time.perf_counter() - start
        self.metrics.step.labels("propose").observe(elapsed)
        return elapsed * 1e3, getattr(self.engine.proposer, "last_draft_ms", 0.0)

    def _fail(self, request_id: str, exc: Exception) -> None:
        queue = self._queues.pop(request_id, None)
        self.engine.abort(request_id)
        if queue is not None:
            queue.put_nowait(EngineError(f"engine step failed: {exc}"))

    def _deliver(self, out: RequestOutput) -> None:
        queue = self._queues.get(out.request_id)
        if queue is None:
            return
        now = time.monotonic()
        seq = out.seq
        last = self._last_emit.get(out.request_id)
        if last is None:
            self.metrics.ttft.observe(now - seq.arrival_time)
        elif out.token_ids:
            gap = (now - last) / len(out.token_ids)
            for _ in out.token_ids:
                self.metrics.itl.observe(gap)
        self._last_emit[out.request_id] = now
        self.metrics.generation_tokens.inc(len(out.token_ids))
        if out.finish_reason is not None:
            self.metrics.e2e.observe(now - seq.arrival_time)
            self.metrics.finished.labels(out.finish_reason).inc()
            self._queues.pop(out.request_id, None)
            self._last_emit.pop(out.request_id, None)
        queue.put_nowait(out)

    def _observe_step(self, sched, outputs, start: float, end: float) -> None:
        m = self.metrics
        stats = self.engine.last_stats
        if stats is not None:
            m.step.labels("verify").observe(stats.forward_s)
            m.step.labels("sample").observe(stats.sample_s)
            for _, proposed, accepted in stats.drafts:
                m.draft_tokens.inc(proposed)
                m.accepted_tokens.inc(accepted)
                for position in range(accepted):
                    m.accepted_per_pos.labels(str(position)).inc()
        m.step.labels("total").observe(end - start)
        m.batch_tokens.observe(sched.num_batched_tokens)
        m.preemptions.inc(len(sched.preempted))
        emitted = sum(len(o.token_ids) for o in outputs)
        m.goodput.set(emitted / (end - start) if end > start else 0.0)
        m.chosen_k.set(sum(it.k for it in sched.items) / max(1, len(sched.items)))
        m.cost_model_error.set(self.engine.planner.fitter.relative_error())
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.engine.scheduler.running))
        self.metrics.waiting.set(len(self.engine.scheduler.waiting))
        self.metrics.kv_usage.set(self.engine.kv_usage())
