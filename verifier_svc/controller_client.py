"""The verifier's side of Controller.Connect.

Streams the engine's finished steps to the controller and applies the policy and
proposer endpoints it pushes. The controller is never on the request path: when it
is unreachable the planner keeps the last policy, plans on its own local cost fit,
and this client reconnects with back-off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from engine.planner import SpecPlanner
from protocol.controller import policy_from_pb, step_to_pb
from protocol.security import ClientTLS, bearer
from protocol.v1 import controller_pb2 as pb
from protocol.v1 import controller_pb2_grpc as pb_grpc
from verifier_svc.loop import ServingLoop

log = logging.getLogger(__name__)


class ControllerClient:
    def __init__(
        self,
        address: str,
        verifier_id: str,
        loop: ServingLoop,
        on_endpoints: Callable[[list[str]], Awaitable[None]] | None = None,
        report_every_s: float = 0.25,
        backoff_s: tuple[float, float] = (0.2, 5.0),
        tls: ClientTLS = ClientTLS(),
        token: str | None = None,
    ):
        """`on_endpoints`: applies a pushed proposer endpoint set (None: the verifier's
        proposer has no endpoints, and pushed ones are ignored)."""
        self.address = address
        self.verifier_id = verifier_id
        self.loop = loop
        self.planner: SpecPlanner = loop.engine.planner
        self.on_endpoints = on_endpoints
        self.report_every_s = report_every_s
        self.backoff_s = backoff_s
        self.tls, self.token = tls, token
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
                async with self.tls.aio_channel(self.address) as channel:
                    call = pb_grpc.ControllerStub(channel).Connect(self._reports(), metadata=bearer(self.token))
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
                    log.warning(
                        "controller %s unreachable (%s); keeping policy %s and fitting locally",
                        self.address,
                        exc.code().name,
                        self.planner.policy,
                    )
            except Exception:
                log.exception("controller stream failed")
            self._lost()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_s[1])

    def _lost(self) -> None:
        self.connected.clear()
        self.planner.apply(self.planner.policy, None)  # keep the policy, plan on the local fit

    async def _apply(self, update: pb.ControllerUpdate) -> None:
        if update.HasField("policy"):
            try:
                policy, cost, prior = policy_from_pb(update.policy)
            except ValueError as exc:
                log.warning("ignoring a pushed policy out of bounds: %s", exc)
            else:
                self.planner.apply(policy, cost, prior)
                self.policy_version = update.policy.version
        if update.HasField("endpoints") and update.endpoints.addresses and self.on_endpoints is not None:
            await self.on_endpoints(list(update.endpoints.addresses))

    async def _reports(self):
        steps = self.loop.steps
        while True:
            batch = []
            while steps:
                batch.append(step_to_pb(steps.popleft()))
            yield pb.VerifierReport(verifier_id=self.verifier_id, steps=batch)
            await asyncio.sleep(self.report_every_s)
