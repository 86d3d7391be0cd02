"""Starts the verifier: model, engine, gRPC (Generation, health, reflection), metrics, drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
from dataclasses import dataclass

import grpc
import torch

from controller.profile import load_profile, samples_from_rows
from proposer_svc.server import BUILTIN_DRAFT, MIN_CONFIDENCE_HELP, ProposerConfig
from proposer_svc.servicer import NgramBackend
from smartspec import models
from smartspec.serving import add_config_arguments, config_from_args, start_server, until_signalled
from smartspec.v1 import generation_pb2, generation_pb2_grpc
from verifier_svc.async_engine import AsyncEngine
from verifier_svc.controller_client import ControllerClient
from verifier_svc.engine import Engine, EngineConfig
from verifier_svc.local_proposer import LocalProposer
from verifier_svc.metrics import Metrics
from verifier_svc.planner import Policy
from verifier_svc.proposer_client import ProposerClient
from verifier_svc.servicer import GenerationServicer
from verifier_svc.validation import Limits

log = logging.getLogger(__name__)
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass
class VerifierConfig:
    model: str = models.DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400  # 0 disables the metrics endpoint
    block_size: int = 16
    kv_cache_tokens: int = 65536
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_waiting: int = 256
    max_model_len: int = 0  # 0: the model's own context, capped by the cache
    policy: str = "off"
    proposer: str = ""  # "ngram" / "draft:MODEL" (in this process) or host:port[,host:port...] of replicas
    proposer_deadline_ms: float = 100.0
    draft_min_confidence: float = 0.0  # with proposer draft:MODEL: see ProposerConfig.min_confidence
    controller: str = ""  # host:port of the controller; empty: plan on local fits only
    verifier_id: str = ""  # reported to the controller; empty: hostname:port
    cost_profile: str = ""  # measured step times (JSON[#model]) to start the cost model from; empty: calibrate
    grace_seconds: float = 30.0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        help_ = {
            "model": f"'{models.DEFAULT_MODEL}' (built-in SmolLM2-135M-Instruct), a .gguf file or a HF model directory",
            "dtype": "float32 | bfloat16 | float16",
            "device": "cpu | cuda | cuda:N",
            "metrics_port": "Prometheus /metrics port (0 = off)",
            "kv_cache_tokens": "KV cache capacity in tokens",
            "max_batched_tokens": "token budget per engine step",
            "max_waiting": "waiting-queue bound (beyond it: RESOURCE_EXHAUSTED)",
            "policy": "speculation policy: off | fixed:K | smartspec[:KMAX] | smartspec-uniform[:KMAX] (drafts need --proposer)",
            "proposer": "'ngram' (prompt lookup in this process), 'draft:MODEL' (a draft model in this process, "
                        f"'{BUILTIN_DRAFT}' or a path), host:port[,host:port...] of proposer replicas, "
                        "or dns:NAME:PORT re-resolved every 10 s",
            "proposer_deadline_ms": "a proposer slower than this gives no drafts that step",
            "draft_min_confidence": "with --proposer draft:MODEL: " + MIN_CONFIDENCE_HELP,
            "controller": "host:port of the smartspec controller (policy and cost model pushed from there)",
            "cost_profile": "step-time profile (JSON, FILE#MODEL for one of several) seeding the cost model; "
                            "empty: time a few forward passes at start; 'none': neither",
            "grace_seconds": "on SIGTERM, how long in-flight streams may finish",
        }
        add_config_arguments(parser, VerifierConfig, help_)

    @staticmethod
    def from_args(args: argparse.Namespace) -> "VerifierConfig":
        return config_from_args(VerifierConfig, args)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            block_size=self.block_size, kv_cache_tokens=self.kv_cache_tokens, max_num_seqs=self.max_num_seqs,
            max_batched_tokens=self.max_batched_tokens, max_waiting=self.max_waiting,
            max_model_len=self.max_model_len or None, policy=self.parsed_policy())

    def parsed_policy(self) -> Policy:
        policy = Policy.parse(self.policy)
        if policy.speculates and not self.proposer:
            raise ValueError(f"policy {self.policy!r} needs --proposer")
        return policy

    def make_proposer(self):
        if self.draft_min_confidence and not self.proposer.startswith("draft:"):
            raise ValueError("draft_min_confidence needs --proposer draft:MODEL (remote proposers take "
                             "--min-confidence themselves)")
        if not self.proposer:
            return None
        if self.proposer == "ngram":
            return LocalProposer(NgramBackend())
        if self.proposer.startswith("draft:"):
            name = self.proposer.removeprefix("draft:")
            if not name:
                raise ValueError(f"proposer: 'draft:' needs a model ('draft:{BUILTIN_DRAFT}' or a path)")
            # Twice the target's token capacity: the draft's KV is small, and requests the
            # target preempted keep theirs until they finish.
            draft = ProposerConfig(draft=name, dtype=self.dtype, device=self.device,
                                   kv_cache_tokens=2 * self.kv_cache_tokens,
                                   min_confidence=self.draft_min_confidence)
            return LocalProposer(draft.make_backend())
        return ProposerClient([a.strip() for a in self.proposer.split(",") if a.strip()],
                              deadline_s=self.proposer_deadline_ms / 1e3)


class Verifier:
    """A running verifier; `drain()` is what SIGTERM triggers."""

    def __init__(self, config: VerifierConfig, model=None, tokenizer=None):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(config.model)
        if model is None:
            model = models.load_model(config.model, config.dtype, config.device)
        engine_config = config.engine_config()
        self.engine = Engine(model, self.tokenizer, engine_config, config.make_proposer())
        if self.engine.proposer is not None:
            self._seed_cost_model()
        self.metrics = Metrics()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    def _seed_cost_model(self) -> None:
        profile = self.config.cost_profile
        if profile == "none":
            return
        if profile:
            samples = load_profile(profile)
        else:
            start = time.perf_counter()
            samples = samples_from_rows(self.engine.calibrate())
            log.info("calibrated the cost model on %d shapes in %.1f s", len(samples), time.perf_counter() - start)
        self.engine.planner.fitter.seed(samples)

    async def start(self) -> None:
        self.async_engine = AsyncEngine(self.engine, self.metrics)
        self.async_engine.start()
        self.controller = None
        if self.config.controller:
            verifier_id = self.config.verifier_id or f"{socket.gethostname()}:{self.config.port}"
            self.controller = ControllerClient(self.config.controller, verifier_id, self.async_engine)
            self.controller.start()
        limits = Limits(vocab_size=self.engine.vocab_size, max_model_len=self.engine.max_model_len)
        self.servicer = GenerationServicer(self.async_engine, self.tokenizer, limits)
        if self.config.metrics_port:
            self.metrics_server, _ = self.metrics.serve(self.config.metrics_port, self.config.host)
        self.server, self.health, self.port = await start_server(
            generation_pb2_grpc.add_GenerationServicer_to_server, self.servicer, SERVICE_NAME,
            self.config.host, self.config.port)
        log.info("verifier serving on %s:%d", self.config.host, self.port)

    async def drain(self) -> None:
        """Refuses new calls, lets in-flight streams finish within the grace period, then stops."""
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + self.config.grace_seconds
        while self.async_engine.num_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.async_engine.num_requests:
            log.warning("grace period over: aborting %d requests", self.async_engine.num_requests)
            self.async_engine.abort_all()
        await self.server.stop(grace=1.0)
        if self.controller is not None:
            await self.controller.stop()
        await self.async_engine.stop()
        if isinstance(self.engine.proposer, ProposerClient):
            await self.engine.proposer.close()
        if self.config.metrics_port:
            self.metrics_server.shutdown()


async def serve(config: VerifierConfig) -> None:
    verifier = Verifier(config)
    await verifier.start()
    print(f"smartspec verifier ready on {config.host}:{verifier.port}", flush=True)
    await until_signalled()
    log.info("signal received: draining")
    await verifier.drain()


def main(args: argparse.Namespace) -> int:
    asyncio.run(serve(VerifierConfig.from_args(args)))
    return 0
