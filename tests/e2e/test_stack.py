"""`smartspec up` as real processes: SmolLM2 verifying drafts from a proposer process (the
built-in draft model, or n-gram lookup), lossless for fixed k in {1, 3, 5} with 8 concurrent requests,
and under the goodput policy set through the controller. The n-gram stack runs with `--tls`:
mTLS on every hop, the test's own calls included."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
from greedy_reference import STACK_PROMPTS, assert_same_greedy, hf_greedy

from protocol.security import ClientTLS
from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc
from smartspec.up import wait_serving

NEW_TOKENS = 24


@pytest.mark.slow
@pytest.mark.parametrize(
    "proposer, mtls", [(["--ngram"], True), (["--draft", "smollm2-draft"], False)], ids=["ngram-mtls", "builtin-draft"]
)
def test_up_stack_is_lossless(proposer, mtls, unused_tcp_port, smollm2_tokenizer, smollm2_pair, tmp_path):
    port, proposer_port, controller_port = unused_tcp_port, unused_tcp_port + 1, unused_tcp_port + 2
    tls = ClientTLS()
    if mtls:
        proposer = [*proposer, "--tls", "--tls-dir", str(tmp_path)]
        tls = ClientTLS(str(tmp_path / "ca.pem"), str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in vars(tls).items() if value]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smartspec.cli",
            "up",
            *proposer,
            "--port",
            str(port),
            "--proposer-port",
            str(proposer_port),
            "--controller-port",
            str(controller_port),
            "--metrics-port",
            "0",
            "--policy",
            "off",
            "--http-port",
            str(port + 3),
        ]
    )
    reference = smollm2_pair[1]
    try:
        deadline = time.monotonic() + 120  # `up --tls` writes its certificates once it has started
        while mtls and not (tmp_path / "client.key").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        wait_serving(port, proc, 180, tls)
        if mtls:  # plaintext and certificate-less calls are refused
            with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, pytest.raises(grpc.RpcError):
                list(
                    pb_grpc.GenerationStub(plain).Generate(
                        pb.GenerateRequest(prompt_text="x", max_new_tokens=1), timeout=10
                    )
                )
            with ClientTLS(tls.tls_ca).channel(f"127.0.0.1:{port}") as anonymous, pytest.raises(grpc.RpcError):
                list(
                    pb_grpc.GenerationStub(anonymous).Generate(
                        pb.GenerateRequest(prompt_text="x", max_new_tokens=1), timeout=10
                    )
                )
        with tls.channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            ids = [smollm2_tokenizer(p).input_ids for p in STACK_PROMPTS]

            def generate(prompt_ids, k):
                mode = pb.SPECULATION_MODE_FIXED if k else pb.SPECULATION_MODE_AUTO
                chunks = list(
                    stub.Generate(
                        pb.GenerateRequest(
                            prompt_token_ids=pb.TokenIds(ids=prompt_ids),
                            max_new_tokens=NEW_TOKENS,
                            speculation=pb.Speculation(mode=mode, k=k),
                            trace_speculation=True,
                        ),
                        timeout=300,
                    )
                )
                return [t for c in chunks for t in c.token_ids], chunks[-1].speculation

            expected = [hf_greedy(reference, p, NEW_TOKENS) for p in ids]
            with ThreadPoolExecutor(8) as pool:
                for k in (1, 3, 5):
                    results = list(pool.map(lambda p, k=k: generate(p, k), ids))
                    for p, want, (got, _) in zip(ids, expected, results):
                        assert_same_greedy(reference, p, got, want)
                    assert sum(s.proposed_tokens for _, s in results) > 0
                    assert sum(s.accepted_tokens for _, s in results) > 0
                    for _, s in results:  # the traced rounds, over the wire, add up to the totals
                        assert all(r.accepted <= r.proposed <= r.k <= k for r in s.rounds)
                        assert sum(r.proposed for r in s.rounds) == s.proposed_tokens
                        assert sum(r.accepted for r in s.rounds) == s.accepted_tokens
                # The goodput policy, set at run time; whatever k it picks, output is the target's.
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "smartspec.cli",
                        "ctl",
                        "--controller",
                        f"127.0.0.1:{controller_port}",
                        *flags,
                        "set",
                        "smartspec",
                    ],
                    check=True,
                    timeout=30,
                )
                time.sleep(0.5)
                for p, want, (got, _) in zip(ids, expected, pool.map(lambda p: generate(p, 0), ids)):
                    assert_same_greedy(reference, p, got, want)
            if not mtls:  # the stack's OpenAI-compatible door: the same engine, the same greedy output
                api = openai.OpenAI(base_url=f"http://127.0.0.1:{port + 3}/v1", api_key="-", max_retries=0)
                for p in ids[:2]:
                    out = api.completions.create(
                        model="smollm2", prompt=p, max_tokens=NEW_TOKENS, temperature=0,
                        extra_body={"speculation": {"mode": "fixed", "k": 3}},
                    )  # fmt: skip
                    via_grpc = generate(p, 3)[0]
                    assert out.choices[0].text == smollm2_tokenizer.decode(via_grpc, skip_special_tokens=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
