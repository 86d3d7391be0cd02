"""The verifier's side of Controller.Connect.

Streams the engine's finished steps to the controller and applies the policy and
proposer endpoints it pushes. The controller is never on the request path: when it
is unreachable the planner keeps the last policy, plans on its own local cost fit,
and this client reconnects with back-off.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from controller_svc.convert import policy_from_pb, step_to_pb
from smartspec.v1 import controller_pb2 as pb
from smartspec.v1 import controller_pb2_grpc as pb_grpc
from verifier_svc.async_engine import AsyncEngine

log = logging.getLogger(__name__)


class ControllerClient:
    def __init__(self, address: str, verifier_id: str, engine: AsyncEngine, report_every_s: float = 0.25,
                 backoff_s: tuple[float, float] = (0.2, 5.0)):
        self.address = address
        self.verifier_id = verifier_id
        self.engine = engine
        self.report_every_s = report_every_s
        self.backoff_s = backoff_s
        self.connected = asyncio.Event()
        self.policy_version = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = self.backoff_s[0]
        while True:
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    call = pb_grpc.ControllerStub(channel).Connect(self._reports())
                    async for update in call:
                        if not self.connected.is_set():
                            log.info("connected to controller %s", self.address)
                            self.connected.set()
                            delay = self.backoff_s[0]
                        await self._apply(update)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self.connected.is_set() or delay == self.backoff_s[0]:
                    log.warning("controller %s unreachable (%s); keeping policy %s and fitting locally",
                                self.address, exc.code().name, self.engine.engine.planner.policy)
            except Exception:
                log.exception("controller stream failed")
            self._lost()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_s[1])

    def _lost(self) -> None:
        self.connected.clear()
        planner = self.engine.engine.planner
        planner.apply(planner.policy, None)  # keep the policy, plan on the local fit

    async def _apply(self, update: pb.ControllerUpdate) -> None:
        if update.HasField("policy"):
            policy, cost, prior = policy_from_pb(update.policy)
            self.engine.engine.planner.apply(policy, cost, prior)
            self.policy_version = update.policy.version
        if update.HasField("endpoints") and update.endpoints.addresses:
            set_endpoints = getattr(self.engine.engine.proposer, "set_endpoints", None)
            if set_endpoints is not None:
                await set_endpoints(list(update.endpoints.addresses))

    async def _reports(self):
        steps = self.engine.steps
        while True:
            batch = []
            while steps:
                r = steps.popleft()
                batch.append(step_to_pb(r.step_id, r.stats, r.propose_ms, r.draft_ms, r.step_ms, r.emitted_tokens))
            yield pb.VerifierReport(verifier_id=self.verifier_id, steps=batch)
            await asyncio.sleep(self.report_every_s)
