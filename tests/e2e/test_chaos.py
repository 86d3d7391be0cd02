"""`smartspec up` under load loses a proposer replica and then the controller to SIGKILL: no request
fails, greedy output stays the target's, both come back on their ports, and `up` itself stays up
until SIGTERM, then exits cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
from greedy_reference import STACK_PROMPTS, assert_same_greedy, hf_greedy

from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc
from smartspec.up import wait_serving

NEW_TOKENS = 16
CLIENTS = 12  # each sends greedy requests back to back until the killed processes serve again


def child(up: subprocess.Popen, role: str, port: int) -> psutil.Process | None:
    """The live child of `up` running `smartspec <role> ... --port <port>`."""
    for proc in psutil.Process(up.pid).children():
        try:
            cmd = proc.cmdline()
        except psutil.NoSuchProcess:  # zombies included: a killed child not yet reaped by `up`
            continue
        if cmd[3:4] == [role] and cmd[cmd.index("--port") + 1] == str(port):
            return proc
    return None


def kill(up: subprocess.Popen, role: str, port: int) -> int:
    proc = child(up, role, port)
    proc.send_signal(signal.SIGKILL)
    return proc.pid


def started_again(up: subprocess.Popen, role: str, port: int, killed: int) -> int:
    """The pid of the process that replaced `killed`, once it serves on the same port."""
    deadline = time.monotonic() + 120
    while (new := child(up, role, port)) is None or new.pid == killed:
        assert time.monotonic() < deadline, f"{role} on port {port} was not started again"
        time.sleep(0.1)
    wait_serving(port, up, 120)  # `up` is the process watched: it must stay alive meanwhile
    return new.pid


@pytest.mark.slow
def test_up_restarts_a_killed_proposer_and_controller_under_load(
    unused_tcp_port, smollm2_tokenizer, smollm2_pair, tmp_path
):
    port = unused_tcp_port
    proposer_port, controller_port = port + 1, port + 3
    victims = [("proposer", proposer_port), ("controller", controller_port)]  # killed in this order
    stdout, stderr = tmp_path / "up.stdout", tmp_path / "up.stderr"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        up = subprocess.Popen(
            [
                *(sys.executable, "-m", "smartspec.cli", "up", "--ngram", "--replicas", "2"),
                *("--port", str(port), "--proposer-port", str(proposer_port)),
                *("--controller-port", str(controller_port), "--metrics-port", "0", "--policy", "fixed:3"),
                *("--cost-profile", "none", "--http-port", "0"),  # a fixed policy plans with no cost model
            ],
            stdout=out,
            stderr=err,
        )
    reference = smollm2_pair[1]
    ids = [smollm2_tokenizer(p).input_ids for p in STACK_PROMPTS]
    results, failures, stop = [], [], threading.Event()
    try:
        with ThreadPoolExecutor(1) as pool:  # the target's own output, while the stack starts
            expected = pool.submit(lambda: [hf_greedy(reference, p, NEW_TOKENS) for p in ids])
            deadline = time.monotonic() + 300
            while "smartspec stack up" not in stdout.read_text():  # `up` supervises from here on
                assert up.poll() is None and time.monotonic() < deadline, "the stack did not come up"
                time.sleep(0.2)
            expected = expected.result()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationStub(channel)

            def client(i: int) -> None:
                """Greedy requests back to back until told to stop."""
                n = i
                while not stop.is_set():
                    p = n % len(ids)
                    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids[p]), max_new_tokens=NEW_TOKENS)
                    try:
                        chunks = list(stub.Generate(request, timeout=120))
                        results.append((p, [t for c in chunks for t in c.token_ids], chunks[-1].speculation))
                    except grpc.RpcError as e:
                        failures.append(e)
                    n += CLIENTS

            def served(at_least: int, timeout: float = 120) -> None:
                deadline = time.monotonic() + timeout
                while len(results) < at_least:
                    assert time.monotonic() < deadline and not failures, (len(results), failures[:1])
                    time.sleep(0.05)

            with ThreadPoolExecutor(CLIENTS) as pool:
                clients = [pool.submit(client, i) for i in range(CLIENTS)]
                try:
                    served(1)  # every client is in the middle of a request from here on
                    killed = []
                    for role, p in victims:
                        killed.append(kill(up, role, p))
                        time.sleep(1)
                    before = len(results)
                    new = [started_again(up, role, p, pid) for (role, p), pid in zip(victims, killed)]
                finally:
                    stop.set()
                    for c in clients:
                        c.result()
        assert failures == []
        assert len(results) - before >= CLIENTS  # each client's request in flight through the kills ended well
        for p, got, _ in results:
            assert_same_greedy(reference, ids[p], got, expected[p])
        assert sum(s.proposed_tokens for _, _, s in results) > 0
        assert up.poll() is None
        log = stderr.read_text()
        for (role, p), old, pid in zip(victims, killed, new):
            assert f"{role} on port {p} (pid {old}) killed by SIGKILL; restarting it in 0.5 s" in log
            assert f"{role} on port {p} started again as pid {pid} (restart 1)" in log
        children = psutil.Process(up.pid).children()
        assert len(children) == 4
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=120)
        sys.stderr.write(stderr.read_text()[-8000:])  # shown when the test fails
    assert code == 0
    assert psutil.wait_procs(children, timeout=10)[1] == []  # none left behind
