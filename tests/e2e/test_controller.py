"""A verifier with a controller process: the policy is pushed; killing the controller mid-load fails
no request and the verifier keeps the last policy; a restarted controller gets the verifier back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from greedy_reference import assert_same_greedy, hf_greedy
from service_threads import VerifierThread, wait_for

from protocol.v1 import generation_pb2 as pb
from runtime.models import load_model
from smartspec.up import wait_serving

NEW_TOKENS = 40
PROMPTS = [[2 + (i * 7 + j * 3) % 10 for j in range(4 + i % 5)] for i in range(8)]


def start_controller(port: int, policy: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smartspec.cli",
            "controller",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--policy",
            policy,
            "--push-interval-s",
            "0.2",
        ]
    )
    wait_serving(port, proc, 60)
    return proc


def ctl(port: int, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "smartspec.cli", "ctl", "--controller", f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.slow
def test_controller_killed_and_restarted_under_load(small_vocab_dir, smollm2_tokenizer, unused_tcp_port):
    model, reference = load_model(small_vocab_dir), load_model(small_vocab_dir)
    port = unused_tcp_port
    controller = start_controller(port, "fixed:2")
    verifier = VerifierThread(model, smollm2_tokenizer, ["ngram"], controller=f"127.0.0.1:{port}", cost_profile="none")
    planner = verifier.verifier.engine.planner
    client = verifier.verifier.controller
    try:
        wait_for(lambda: str(planner.policy) == "fixed:2")
        streams = [
            verifier.stub.Generate(
                pb.GenerateRequest(
                    request_id=f"r{i}", prompt_token_ids=pb.TokenIds(ids=p), max_new_tokens=NEW_TOKENS, ignore_eos=True
                ),
                timeout=120,
            )
            for i, p in enumerate(PROMPTS)
        ]
        first = [[next(s)] for s in streams]
        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=10)
        chunks = [f + list(s) for f, s in zip(first, streams)]
        for prompt, cs in zip(PROMPTS, chunks):
            tokens = [t for c in cs for t in c.token_ids]
            assert len(tokens) == NEW_TOKENS
            assert_same_greedy(reference, prompt, tokens, hf_greedy(reference, prompt, NEW_TOKENS, ignore_eos=True))
        assert sum(cs[-1].speculation.proposed_tokens for cs in chunks) > 0
        wait_for(lambda: not client.connected.is_set())
        assert str(planner.policy) == "fixed:2"  # kept
        assert planner.pushed_cost is None  # planning on the local fit meanwhile

        controller = start_controller(port, "smartspec:4")
        wait_for(lambda: client.connected.is_set() and str(planner.policy) == "smartspec:4", timeout=30)
        assert ctl(port, "set", "smartspec-uniform:3")["mode"] == "smartspec-uniform"
        wait_for(lambda: str(planner.policy) == "smartspec-uniform:3")
        list(
            verifier.stub.Generate(
                pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=PROMPTS[0]), max_new_tokens=8, ignore_eos=True),
                timeout=60,
            )
        )
        wait_for(lambda: ctl(port, "get")["cost_model"]["steps_fitted"] > 0, timeout=30)
    finally:
        verifier.close()
        if controller.poll() is None:
            controller.terminate()
            controller.wait(timeout=30)
