"""Shared fixtures: the built-in SmolLM2 and a tiny random Llama, both loaded once per session."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# The CPU linear products are timed once per machine and cached; the tests (and the processes
# they start) share one cache of their own instead of the user's.
os.environ.setdefault("SMARTSPEC_CACHE_DIR", tempfile.mkdtemp(prefix="smartspec-test-cache-"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from runtime.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A randomly initialised 2-layer Llama (GQA) saved with SmolLM2's tokenizer.

    Weights are scaled up so its next-token distributions are peaked rather
    than uniform: greedy comparisons then rarely meet near-ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        pad_token_id=smollm2_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_pair():
    """Two separate SmolLM2 instances: one for the engine, one as the Hugging Face reference."""
    from runtime.models import load_model

    return load_model("smollm2"), load_model("smollm2")


@pytest.fixture
def compiles(monkeypatch) -> list:
    """One entry per compile of the graph runners' forward (runtime.graphs), from a clean
    start: no compiled code from other tests."""
    import runtime.graphs as graphs

    made = []
    real = graphs._inductor_without_host_reads
    monkeypatch.setattr(graphs, "_inductor_without_host_reads", lambda gm, ex: made.append(1) or real(gm, ex))
    torch._dynamo.reset()
    return made


@pytest.fixture
def unused_tcp_port() -> int:
    """A free port below the kernel's ephemeral range, with the next three free too (tests start
    services on port + 1 ..). Tests kill servers and start them again on their ports; a port in
    the ephemeral range can meanwhile become the local end of an outgoing connection, and the
    restarted server's bind then fails with "Address already in use"."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except OSError:  # not Linux: IANA's dynamic range
        ephemeral = 49152
    rng = random.Random()
    for _ in range(1000):
        base = rng.randrange(10000, ephemeral - 4)
        socks = []
        try:
            for port in range(base, base + 4):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no four free consecutive ports below the ephemeral range")


def random_llama(tmp_path_factory, name: str, seed: int, **config) -> str:
    """A random 2-layer Llama with 4 heads and 2 KV heads (and `config`) saved under a new
    directory; its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **config)
    path = tmp_path_factory.mktemp(name)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def small_vocab_dir(tmp_path_factory):
    """A random Llama over 12 tokens: distributions with real mass on several tokens."""
    return random_llama(
        tmp_path_factory,
        "small-vocab",
        7,
        vocab_size=12,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.15,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


@pytest.fixture(scope="session")
def gpu_llama_dir(tmp_path_factory):
    """A random Llama with a head dim of 16 (what the Triton kernel takes) and no tokenizer:
    the GPU-only tests need nothing a device machine lacks (the built-in GGUF)."""
    return random_llama(
        tmp_path_factory,
        "gpu-llama",
        11,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=1024,
        initializer_range=0.3,
    )
