"""A verifier on loopback with the tiny random Llama, made per test (the model loaded once)."""

from __future__ import annotations

import pytest
from service_threads import VerifierThread

from runtime.models import load_model


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir, smollm2_tokenizer):
    return load_model(tiny_llama_dir), smollm2_tokenizer


@pytest.fixture
def make_server(model_and_tokenizer):
    servers = []

    def make(**overrides) -> VerifierThread:
        servers.append(VerifierThread(*model_and_tokenizer, [], **{"grace_seconds": 10.0, **overrides}))
        return servers[-1]

    yield make
    for s in servers:
        s.close()
