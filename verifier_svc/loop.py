"""The verifier's serving loop: awaits `Engine.step()` while there is work, and fans its
outputs out to each request's queue, with the Prometheus metrics read from each step's record.

Everything runs on one event loop; the engine moves its forward pass to a worker thread
itself, so streams keep flowing while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from controller.policy import Policy
from controller.profile import step_line
from controller.step import StepRecord
from engine.engine import Engine
from engine.output import FinishReason, RequestOutput
from runtime.sampler import SamplingParams
from verifier_svc.metrics import Metrics

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine failed step after step: the process should go, for its supervisor to restart it."""


class ServingLoop:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics | None = None,
        keep_steps: int = 4096,
        step_log=None,
        max_failed_steps: int = 8,
    ):
        self.engine = engine
        self.metrics = metrics or Metrics()
        # Steps in a row that may fail before the engine is declared dead (one bad step is a
        # bad batch; a run of them is a broken device or state).
        self.max_failed_steps = max_failed_steps
        self.failed = asyncio.Event()  # set when the loop ended by an error: nothing serves any more
        self.step_log = step_log  # a text file: one line per step (controller.profile.step_line)
        self.steps: deque[StepRecord] = deque(maxlen=keep_steps)  # drained by the controller client
        self._queues: dict[str, asyncio.Queue] = {}
        self._last_emit: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("the serving loop died: %r", task.exception())
            self.failed.set()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        policy: Policy | None = None,
        trace: bool = False,
    ) -> asyncio.Queue:
        """Queues a request; its RequestOutputs arrive on the returned queue."""
        self.engine.add_request(request_id, prompt_ids, params, policy, trace)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self._wake.set()
        return queue

    async def follow(self, request_id: str, queue: asyncio.Queue):
        """The request's outputs as they come, up to its finished one (an ERROR one included);
        a caller that stops early (its client went, a deadline) aborts the request, which frees
        its KV at the end of the running step."""
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stops delivering outputs at once; the engine frees the request's KV."""
        self._queues.pop(request_id, None)
        self._last_emit.pop(request_id, None)
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
                if self.engine.proposer is not None:
                    try:
                        await self.engine.proposer.flush()
                    except Exception:  # releases are housekeeping: never worth the loop
                        log.exception("flushing draft releases failed")
                if not self.engine.has_work():
                    await self._wake.wait()
                continue
            try:
                outputs = await self.engine.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug outside the step's own guards: count it like a failed step
                log.exception("engine step raised")
                self.engine.consecutive_failures += 1
                outputs = []
            for out in outputs:  # failed requests hear so before the loop gives up
                self._deliver(out)
            if self.engine.consecutive_failures >= self.max_failed_steps:
                raise EngineFailed(f"{self.engine.consecutive_failures} engine steps in a row failed")
            record = self.engine.last_step
            if record is not None:  # None after a failed step
                self.steps.append(record)
                self._observe(record)
                if self.step_log is not None:
                    self.step_log.write(step_line(record, time.monotonic()) + "\n")

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

    def _observe(self, step: StepRecord) -> None:
        m = self.metrics
        if step.propose_ms > 0:
            m.step.labels("propose").observe(step.propose_ms / 1e3)
        m.step.labels("verify").observe((step.verify_ms - step.sample_ms) / 1e3)
        m.step.labels("sample").observe(step.sample_ms / 1e3)
        m.step.labels("total").observe(step.step_ms / 1e3)
        m.proposer_failures.inc(step.proposer_failures)
        for _, proposed, accepted in step.drafts:
            m.draft_tokens.inc(proposed)
            m.accepted_tokens.inc(accepted)
            for position in range(accepted):
                m.accepted_per_pos.labels(str(position)).inc()
        m.batch_tokens.observe(step.num_batched_tokens - sum(p for _, p, _ in step.drafts))
        m.preemptions.inc(step.num_preempted)
        m.goodput.set(1e3 * step.emitted_tokens / step.step_ms if step.step_ms > 0 else 0.0)
        m.chosen_k.set(sum(step.planned_k) / max(1, step.batch_size))
        m.cost_model_error.set(self.engine.planner.fitter.relative_error())
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.engine.scheduler.running))
        self.metrics.waiting.set(len(self.engine.scheduler.waiting))
        self.metrics.kv_usage.set(self.engine.kv_usage())
