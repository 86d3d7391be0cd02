"""Starts a proposer: smartspec.v1.Proposer (n-gram prompt lookup), health and reflection."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass

import grpc

from proposer_svc.draft_model import check_min_confidence
from proposer_svc.servicer import NgramBackend, ProposerServicer
from smartspec.serving import add_config_arguments, config_from_args, start_server, until_signalled
from smartspec.v1 import proposer_pb2, proposer_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = proposer_pb2.DESCRIPTOR.services_by_name["Proposer"].full_name


BUILTIN_DRAFT = "smollm2-draft"
MIN_CONFIDENCE_HELP = ("stop a request's draft after a position where the draft model's most likely token "
                       "had less than this probability (0 = draft all k tokens)")


def builtin_draft_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "models", BUILTIN_DRAFT)


@dataclass
class ProposerConfig:
    host: str = "127.0.0.1"
    port: int = 50061
    draft: str = ""  # draft model: 'smollm2-draft' (built-in), a directory or a .gguf file; empty = n-gram
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache_tokens: int = 65536
    top_k_cap: int = 32  # sampled drafts come from at most this many tokens
    min_confidence: float = 0.0  # see MIN_CONFIDENCE_HELP
    full_head: bool = False  # draft over the whole vocabulary even when the model has a head_vocab.json
    ngram_min: int = 1
    ngram_max: int = 4
    max_k: int = 8
    max_requests: int = 4096  # kept request states; the least recently used are evicted
    threads: int = 0  # torch intra-op threads for the draft model; 0 keeps torch's default

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        kind = parser.add_mutually_exclusive_group(required=True)
        kind.add_argument("--ngram", action="store_true", help="draft by n-gram prompt lookup")
        kind.add_argument("--draft", help=f"draft model: '{BUILTIN_DRAFT}' (built-in), a directory or a .gguf file")
        add_config_arguments(parser, ProposerConfig, {
            "threads": "torch threads for the draft model (0 = all cores); 1 when it shares cores with a verifier",
            "min_confidence": MIN_CONFIDENCE_HELP,
            "full_head": "draft over the whole vocabulary, ignoring the draft's head_vocab.json",
        }, skip=("draft",))

    @staticmethod
    def from_args(args: argparse.Namespace) -> "ProposerConfig":
        config = config_from_args(ProposerConfig, args)
        config.draft = config.draft or ""
        return config

    def make_backend(self):
        check_min_confidence(self.min_confidence)  # before a model loads
        if self.min_confidence and not self.draft:
            raise ValueError("min_confidence needs a draft model; n-gram drafts have no confidence")
        if not self.draft:
            return NgramBackend(self.ngram_min, self.ngram_max)
        import torch

        from proposer_svc import head_vocab
        from proposer_svc.draft_model import DraftModelBackend
        from smartspec import models

        if self.threads:
            torch.set_num_threads(self.threads)
        path = builtin_draft_dir() if self.draft == BUILTIN_DRAFT else self.draft
        model = models.load_model(path, self.dtype, self.device)
        head = None if self.full_head else head_vocab.load(path)  # None for a .gguf file or a model without one
        return DraftModelBackend(model, self.kv_cache_tokens, top_k_cap=self.top_k_cap,
                                 min_confidence=self.min_confidence, head_vocab=head)


class ProposerServer:
    def __init__(self, config: ProposerConfig, backend=None):
        self.config = config
        backend = backend if backend is not None else config.make_backend()
        self.servicer = ProposerServicer(backend, config.max_k, config.max_requests)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server, self.health, self.port = await start_server(
            proposer_pb2_grpc.add_ProposerServicer_to_server, self.servicer, SERVICE_NAME,
            self.config.host, self.config.port)

    async def stop(self, grace: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def serve(config: ProposerConfig) -> None:
    server = ProposerServer(config)
    await server.start()
    print(f"smartspec proposer ready on {config.host}:{server.port}", flush=True)
    await until_signalled()
    await server.stop()


def main(args: argparse.Namespace) -> int:
    asyncio.run(serve(ProposerConfig.from_args(args)))
    return 0
