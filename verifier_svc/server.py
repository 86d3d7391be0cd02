"""Starts the verifier: model, engine, gRPC (Generation, health, reflection), metrics, drain."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import time
from dataclasses import asdict, dataclass, field, replace

from controller.policy import Policy
from controller.profile import load_profile, steps_from_rows
from drafting.builtin import BUILTIN_DRAFT
from drafting.config import MIN_CONFIDENCE_HELP, DraftConfig
from drafting.local import LocalProposer
from engine.calibration import calibrate
from engine.config import CacheConfig, EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from protocol import serving
from protocol.auth import TokenFile, guard
from protocol.generation import Limits
from protocol.security import ClientTLS, read_token
from protocol.serving import ServerConfig
from protocol.v1 import generation_pb2, generation_pb2_grpc
from runtime import models
from runtime.cpu_linear import describe
from runtime.models import Placement
from verifier_svc.controller_client import ControllerClient
from verifier_svc.http import HttpServer, OpenAIFront, model_name
from verifier_svc.loop import ServingLoop
from verifier_svc.metrics import Metrics
from verifier_svc.prompts import PromptTokenizer
from verifier_svc.proposer_client import ProposerClient
from verifier_svc.servicer import GenerationServicer

log = logging.getLogger(__name__)
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class SpeculationConfig:
    policy: str = field(
        default="off",
        metadata={"help": "off | fixed:K | smartspec[:KMAX] | smartspec-uniform[:KMAX] (drafts need --proposer)"},
    )
    proposer: str | None = field(
        default=None,
        metadata={
            "help": "'ngram' (prompt lookup in this process), 'draft:MODEL' (a draft model in this process, "
            f"'{BUILTIN_DRAFT}' or a path), host:port[,host:port...] of proposer replicas, "
            "dns:NAME:PORT re-resolved every 10 s, or k8s:[NAMESPACE/]SERVICE:PORT: the ready endpoints "
            "of a Kubernetes Service, watched on the API server (in-cluster; namespace: the pod's own; "
            "needs list and watch on endpointslices)"
        },
    )
    proposer_deadline_ms: float = field(
        default=100.0, metadata={"help": "a proposer slower than this gives no drafts that step"}
    )
    draft_min_confidence: float = field(
        default=0.0, metadata={"help": "with --proposer draft:MODEL: " + MIN_CONFIDENCE_HELP}
    )
    controller: str | None = field(
        default=None,
        metadata={"help": "host:port of the smartspec controller (policy and cost model pushed from there)"},
    )
    verifier_id: str | None = field(
        default=None, metadata={"help": "the name reported to the controller (unset: hostname:port)"}
    )
    cost_profile: str = field(
        default="calibrate",
        metadata={
            "help": "what seeds the cost model: 'calibrate' (time a few forward passes at start), "
            "a step-time profile (JSON, FILE#MODEL for one of several) or 'none'"
        },
    )

    def parsed_policy(self) -> Policy:
        policy = Policy.parse(self.policy)
        if policy.speculates and not self.proposer:
            raise ValueError(f"policy {self.policy!r} needs --proposer")
        return policy

    def make_proposer(self, placement: Placement, kv_cache_tokens: int, tls=ClientTLS(), token=None, limits=None):
        if self.draft_min_confidence and not (self.proposer or "").startswith("draft:"):
            raise ValueError(
                "draft_min_confidence needs --proposer draft:MODEL (remote proposers take --min-confidence themselves)"
            )
        if not self.proposer:
            return None
        if self.proposer == "ngram":
            return LocalProposer(DraftConfig().make_backend())
        if self.proposer.startswith("draft:"):
            name = self.proposer.removeprefix("draft:")
            if not name:
                raise ValueError(f"proposer: 'draft:' needs a model ('draft:{BUILTIN_DRAFT}' or a path)")
            # Twice the target's token capacity: the draft's KV is small, and requests the
            # target preempted keep theirs until they finish.
            limits = limits or SchedulerConfig()  # the draft's graphs cover the steps these allow
            draft = DraftConfig(name, 2 * kv_cache_tokens, min_confidence=self.draft_min_confidence)
            draft = replace(draft, max_batch=limits.max_num_seqs, max_model_len=limits.max_model_len)
            return LocalProposer(draft.make_backend(replace(placement, threads=0)))
        endpoints = [a.strip() for a in self.proposer.split(",") if a.strip()]
        return ProposerClient(endpoints, deadline_s=self.proposer_deadline_ms / 1e3, tls=tls, token=token)


@dataclass(frozen=True)
class VerifierConfig:
    model: str = field(
        default=models.DEFAULT_MODEL,
        metadata={
            "help": f"'{models.DEFAULT_MODEL}' (built-in SmolLM2-135M-Instruct), a .gguf file or a HF model directory"
        },
    )
    placement: Placement = Placement()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    speculation: SpeculationConfig = SpeculationConfig()
    # Connections are recycled every 5 minutes so that clients spread over replicas added since.
    server: ServerConfig = ServerConfig(port=50051, metrics_port=9400, max_connection_age_s=300.0)
    max_prompt_bytes: int = field(
        default=1 << 20, metadata={"help": "prompt_text longer than this (UTF-8 bytes) is refused before tokenizing"}
    )
    max_new_tokens_cap: int | None = field(
        default=None, metadata={"help": "the most tokens one request may ask for (unset: the context bounds it)"}
    )
    http_port: int = field(
        default=0,
        metadata={
            "help": "port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
            "/health) on the same engine, with the same TLS and API keys (0 = off)"
        },
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "the model name the HTTP API answers to (unset: the --model value's name)"}
    )
    grace_seconds: float = field(default=30.0, metadata={"help": "on SIGTERM, how long in-flight streams may finish"})
    api_keys_file: str | None = field(
        default=None, metadata={"help": "API keys (one per line) callers of Generation must present (unset: open)"}
    )
    # Toward the proposers and the controller.
    client: ClientTLS = ClientTLS()
    service_token_file: str | None = field(
        default=None, metadata={"help": "token this verifier presents to the proposers and the controller"}
    )
    step_log: str | None = field(
        default=None,
        metadata={"help": "append every engine step to this file as a JSON line (a profile for `smartspec simulate`)"},
    )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        serving.add_arguments(parser, VerifierConfig)

    @staticmethod
    def from_args(args: argparse.Namespace) -> VerifierConfig:
        return serving.from_args(VerifierConfig, args)

    def engine_config(self) -> EngineConfig:
        placement = self.placement
        policy = self.speculation.parsed_policy()
        return EngineConfig(self.cache, self.scheduler, policy, placement.graph_mode(), placement.attention)


class Verifier:
    """A running verifier; `drain()` is what SIGTERM triggers."""

    def __init__(self, config: VerifierConfig, model=None, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(config.model)
        if model is None:
            model = config.placement.load(config.model)
        self.token = read_token(config.service_token_file)
        proposer = config.speculation.make_proposer(
            config.placement, config.cache.kv_cache_tokens, config.client, self.token, config.scheduler
        )
        self.engine = Engine(model, self.tokenizer, config.engine_config(), proposer)
        if proposer is not None:
            self._seed_cost_model()
        self.metrics = Metrics()
        for shape, rows, kernel in describe(model):
            self.metrics.cpu_linear.labels(shape, rows, kernel).set(1)
        self.port = 0
        self.draining = False

    def _seed_cost_model(self) -> None:
        profile = self.config.speculation.cost_profile
        if profile == "none":
            return
        if profile == "calibrate":
            start = time.perf_counter()
            steps = steps_from_rows(calibrate(self.engine))
            log.info("calibrated the cost model on %d shapes in %.1f s", len(steps), time.perf_counter() - start)
        else:
            steps = load_profile(profile)
        self.engine.planner.fitter.seed(steps)

    async def start(self) -> None:
        config, spec = self.config.server, self.config.speculation
        self.step_log = None
        if self.config.step_log:
            self.step_log = open(self.config.step_log, "a", buffering=1 << 16)  # noqa: SIM115 (closed in drain)
            engine = {"cache": asdict(self.config.cache), "scheduler": asdict(self.config.scheduler)}
            self.step_log.write(json.dumps({"config": engine}) + "\n")
        self.loop = ServingLoop(self.engine, self.metrics, step_log=self.step_log)
        self.loop.start()
        self.controller = None
        if spec.controller:
            verifier_id = spec.verifier_id or f"{socket.gethostname()}:{config.port}"
            proposer = self.engine.proposer
            on_endpoints = proposer.set_endpoints if isinstance(proposer, ProposerClient) else None
            self.controller = ControllerClient(
                spec.controller, verifier_id, self.loop, on_endpoints, tls=self.config.client, token=self.token
            )
            self.controller.start()
        limits = Limits(
            vocab_size=self.engine.vocab_size,
            max_model_len=self.engine.max_model_len,
            max_prompt_bytes=self.config.max_prompt_bytes,
            max_new_tokens=self.config.max_new_tokens_cap,
        )
        self.prompts = PromptTokenizer(self.tokenizer)
        self.servicer = GenerationServicer(self.loop, self.prompts, limits)
        if config.metrics_port:
            self.metrics_server, _ = self.metrics.serve(config.metrics_port, config.host)
        auth = guard({SERVICE_NAME: ("client",)}, tokens={"client": self.config.api_keys_file})
        self.serving = await serving.start_server(
            generation_pb2_grpc.add_GenerationServicer_to_server, self.servicer, SERVICE_NAME, config, auth
        )
        self.health, self.port = self.serving.health, self.serving.port
        self.http = None
        if self.config.http_port:
            keys = TokenFile(self.config.api_keys_file) if self.config.api_keys_file else None
            front = OpenAIFront(
                self.loop,
                self.prompts,
                limits,
                self.served_model_name,
                keys,
                lambda: self.draining,
                config.max_connection_age_s,
            )
            self.http = HttpServer(front, config.max_message_bytes, self.config.grace_seconds + 2.0)
            self.http_port = await self.http.start(config.host, self.config.http_port, config.tls.ssl_context())
            log.info("OpenAI-compatible API on %s:%d", config.host, self.http_port)
        self._readiness = asyncio.get_running_loop().create_task(self._track_load())
        log.info("verifier serving on %s:%d", config.host, self.port)

    @property
    def served_model_name(self) -> str:
        return self.config.served_model_name or model_name(self.config.model)

    async def _track_load(self, every_s: float = 0.1) -> None:
        """Readiness follows the waiting queue: NOT_SERVING once it is full (new calls would get
        RESOURCE_EXHAUSTED), SERVING again when it is down to half, so the signal does not flap."""
        bound, ready = self.config.scheduler.max_waiting, True
        while True:
            waiting = len(self.engine.scheduler.waiting)
            if ready and waiting >= bound:
                ready = False
                await self.serving.not_ready(SERVICE_NAME)
            elif not ready and waiting <= bound // 2:
                ready = True
                await self.serving.ready(SERVICE_NAME)
            await asyncio.sleep(every_s)

    async def drain(self, grace_seconds: float | None = None, dead: bool = False) -> None:
        """Readiness goes NOT_SERVING and GOAWAY tells clients to go elsewhere; streams in flight
        get the grace period (default: --grace-seconds), then are aborted; then everything stops.
        `dead`: the engine failed, liveness fails too."""
        self._readiness.cancel()  # the queue no longer decides readiness
        await (self.serving.dead() if dead else self.serving.not_ready(SERVICE_NAME))
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        # The server lets calls run a little past the grace: they end on the engine's ABORT
        # rather than on a cancelled stream.
        stopped = asyncio.ensure_future(self.serving.stop(grace + 2.0))
        await asyncio.sleep(0)  # GOAWAY is out: a client's new calls go to another replica
        self.draining = True  # new HTTP requests get 503
        http_stopped = asyncio.ensure_future(self.http.stop() if self.http else asyncio.sleep(0))
        deadline = time.monotonic() + grace
        while self.loop.num_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.loop.num_requests:
            log.warning("grace period over: aborting %d requests", self.loop.num_requests)
            self.loop.abort_all()
        await stopped
        await http_stopped
        self.prompts.close()
        if self.controller is not None:
            await self.controller.stop()
        await self.loop.stop()
        if isinstance(self.engine.proposer, ProposerClient):
            await self.engine.proposer.close()
        if self.config.server.metrics_port:
            self.metrics_server.shutdown()
        if self.step_log is not None:
            self.step_log.close()


async def serve(config: VerifierConfig) -> int:
    """0 after a signal and a drain; 1 when the engine died (health went NOT_SERVING first), so
    that a supervisor restarts the process."""
    verifier = Verifier(config)
    await verifier.start()
    print(f"smartspec verifier ready on {config.server.host}:{verifier.port}", flush=True)
    failed = await serving.until_signalled(verifier.loop.failed)
    if failed:
        log.critical("the engine is dead: not serving, exiting")
        await verifier.drain(grace_seconds=0.0, dead=True)
        return 1
    log.info("signal received: draining")
    await verifier.drain()
    return 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(serve(VerifierConfig.from_args(args)))
