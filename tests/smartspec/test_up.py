"""`smartspec up`'s process list, and its supervisor over cheap stand-in processes (the real ones run
in tests/e2e/test_stack.py and tests/e2e/test_chaos.py)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from service_threads import wait_for

from smartspec import up
from smartspec.supervise import Supervisor


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return parser.parse_args(argv)


def test_proposers_come_first_and_get_one_thread_by_default():
    procs = [cmd for cmd, _ in up.commands(parse("--replicas", "2"))]
    roles = [cmd[3] for cmd in procs]
    assert roles == ["proposer", "proposer", "controller", "verifier"]
    for cmd in procs[:2]:
        assert cmd[cmd.index("--threads") + 1] == "1"
    verifier = procs[-1]
    assert verifier[verifier.index("--proposer") + 1] == "127.0.0.1:50061,127.0.0.1:50062"


def test_every_process_gets_a_metrics_port_of_its_own_and_the_verifier_its_cost_profile():
    procs = [
        cmd for cmd, _ in up.commands(parse("--replicas", "2", "--metrics-port", "9500", "--cost-profile", "none"))
    ]
    ports = [cmd[cmd.index("--metrics-port") + 1] for cmd in procs]
    assert ports == ["9502", "9503", "9501", "9500"]  # proposers, controller, verifier
    assert procs[-1][procs[-1].index("--cost-profile") + 1] == "none"
    off = [cmd for cmd, _ in up.commands(parse("--metrics-port", "0"))]
    assert all(cmd[cmd.index("--metrics-port") + 1] == "0" for cmd in off if "--metrics-port" in cmd)


def test_the_processes_do_not_inherit_service_settings_from_the_environment():
    env = {"PATH": "/bin", "SMARTSPEC_PORT": "1", "SMARTSPEC_MAX_NUM_SEQS": "2", "SMARTSPEC_CACHE_DIR": "/c"}
    assert up.child_environment(env) == {"PATH": "/bin", "SMARTSPEC_CACHE_DIR": "/c"}


def test_proposer_threads_can_be_raised():
    procs = [cmd for cmd, _ in up.commands(parse("--ngram", "--proposer-threads", "2"))]
    assert procs[0][procs[0].index("--threads") + 1] == "2"
    assert "--threads" not in up.commands(parse("--proposer-threads", "0"))[0][0]  # torch's default: all cores
    assert "--ngram" in procs[0]


def test_device_dtype_and_draft_confidence_reach_the_processes():
    procs = [
        cmd for cmd, _ in up.commands(parse("--device", "cuda", "--dtype", "bfloat16", "--draft-min-confidence", "0.4"))
    ]
    for cmd in (procs[0], procs[-1]):  # the draft proposer and the verifier
        assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert procs[0][procs[0].index("--min-confidence") + 1] == "0.4"
    assert "--min-confidence" not in up.commands(parse("--ngram"))[0][0]
    with pytest.raises(ValueError, match="needs a draft model"):
        up.commands(parse("--ngram", "--draft-min-confidence", "0.4"))


def test_tls_gives_every_process_its_certificate_and_the_verifier_a_client_one(tmp_path):
    from smartspec.certs import local_ca

    certs = {"ca": tmp_path / "ca.pem", **local_ca(tmp_path, ["smartspec", "client"])}
    procs = [cmd for cmd, _ in up.commands(parse("--ngram"), certs)]
    cert, key = (str(p) for p in certs["smartspec"])
    for cmd in procs:
        assert cmd[cmd.index("--tls-cert") + 1] == cert and cmd[cmd.index("--tls-key") + 1] == key
        assert cmd[cmd.index("--tls-client-ca") + 1] == str(certs["ca"])  # mTLS: every server asks
    verifier = procs[-1]
    assert verifier[verifier.index("--tls-ca") + 1] == str(certs["ca"])
    assert verifier[verifier.index("--tls-client-cert") + 1] == cert
    assert all("--tls-cert" not in cmd for cmd, _ in up.commands(parse("--ngram")))  # plaintext by default
    assert (tmp_path / "client.key").stat().st_mode & 0o077 == 0  # keys readable by their owner only


# A stand-in for a service: listens on its port until SIGTERM (noted in `stopped`, in the order they
# arrive), for 0.3 s when short-lived. One that fails exits with 3 before listening, at once or on
# every start after its first; one that hangs never listens after its first start.
CHILD = """
import signal, socket, sys, time
from pathlib import Path
name, port, mode, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
ran = tmp / f"{name}.ran"
if mode == "fails" or (mode == "serves-once" and ran.exists()):
    sys.exit(3)
if mode == "hangs-after-first" and ran.exists():
    time.sleep(3600)
ran.touch()
def stopped(*_):
    with open(tmp / "stopped", "a") as f:
        f.write(name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
server = socket.create_server(("127.0.0.1", port))
time.sleep(0.3 if mode == "short-lived" else 3600)
"""


def child(name: str, port: int, mode: str, tmp) -> tuple[list[str], int]:
    return [sys.executable, "-c", CHILD, name, str(port), mode, str(tmp)], port


def free_ports(n: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def listening(port: int, proc, timeout: float) -> None:
    """The supervisor's readiness check, with a TCP connect in place of the gRPC health check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.01)
    raise TimeoutError(f"nothing listening on port {port}")


@contextmanager
def supervising(procs, **knobs):
    """A supervisor running on a thread (signals are the main thread's: see the SIGTERM test)."""
    supervisor = Supervisor(procs, listening, **{"backoff": 0.05, "poll": 0.01, **knobs})
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=supervisor.run()))
    thread.start()
    try:
        yield supervisor, result
    finally:
        supervisor.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_a_killed_process_is_started_again_on_its_port_and_the_others_keep_running(tmp_path, capsys):
    a, b = free_ports(2)
    with supervising([child("a", a, "serves", tmp_path), child("b", b, "serves", tmp_path)]) as (supervisor, result):
        first, second = supervisor.children
        wait_for(lambda: second.ready_at is not None)
        killed, other = first.proc.pid, second.proc.pid
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: first.proc is not None and first.proc.pid != killed and first.ready_at is not None)
        assert (first.restarts, second.restarts, second.proc.pid) == (1, 0, other)
        socket.create_connection(("127.0.0.1", a), timeout=1).close()
    assert result["code"] == 0
    assert (tmp_path / "stopped").read_text().split() == ["b", "a"]
    err = capsys.readouterr().err
    assert f"a on port {a} (pid {killed}) killed by SIGKILL; restarting it in 0.05 s" in err
    assert f"a on port {a} started again as pid {first.proc.pid} (restart 1)" in err


@pytest.mark.parametrize("stable_after, delays", [(60.0, ["0.05", "0.1", "0.2", "0.2"]), (0.1, ["0.05"] * 4)])
def test_back_off_doubles_to_its_cap_and_starts_afresh_after_a_stable_run(tmp_path, capsys, stable_after, delays):
    (port,) = free_ports(1)
    procs = [child("a", port, "short-lived", tmp_path)]
    with supervising(procs, max_backoff=0.2, stable_after=stable_after) as (supervisor, result):
        wait_for(lambda: supervisor.children[0].restarts >= 4)
    assert result["code"] == 0
    logged = re.findall(r"\(pid \d+\) exited with 0; restarting it in ([\d.]+) s", capsys.readouterr().err)
    assert logged[:4] == delays


@pytest.mark.parametrize(
    "mode, death",
    [("serves-once", "exited with 3"), ("hangs-after-first", "killed by SIGKILL")],
    ids=["exits", "hangs"],
)
def test_a_process_that_keeps_failing_to_start_again_takes_the_stack_down(tmp_path, capsys, mode, death):
    a, b = free_ports(2)
    procs = [child("a", a, "serves", tmp_path), child("b", b, mode, tmp_path)]
    with supervising(procs, start_failures=3, startup_timeout=1.0) as (supervisor, result):
        wait_for(lambda: supervisor.children[1].ready_at is not None)
        os.kill(supervisor.children[1].proc.pid, signal.SIGKILL)  # served once: this death is restarted
        wait_for(lambda: "code" in result)
    assert result["code"] == 1
    assert (tmp_path / "stopped").read_text().split() == ["a"]
    err = capsys.readouterr().err
    assert "killed by SIGKILL; restarting it in 0.05 s" in err
    assert re.findall(rf"{death} before serving \((\d) in a row\); (\w+)", err) == [
        ("1", "restarting"),
        ("2", "restarting"),
        ("3", "giving"),
    ]


def test_a_process_that_fails_its_first_start_stops_those_started_before_it(tmp_path, capsys):
    a, b, c = free_ports(3)
    procs = [child("a", a, "serves", tmp_path), child("b", b, "fails", tmp_path), child("c", c, "serves", tmp_path)]
    with supervising(procs) as (supervisor, result):
        wait_for(lambda: "code" in result)
    assert result["code"] == 1 and supervisor.children[2].proc is None  # never started
    assert (tmp_path / "stopped").read_text().split() == ["a"]
    assert f"b on port {b} failed to start: exited with 3" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_stack_last_process_first(tmp_path, sig):
    procs = [child(name, port, "serves", tmp_path) for name, port in zip("abc", free_ports(3))]
    supervisor = Supervisor(procs, listening, poll=0.01)
    before = signal.getsignal(sig)
    assert supervisor.serve(on_up=lambda: os.kill(os.getpid(), sig)) == 0
    assert (tmp_path / "stopped").read_text().split() == ["c", "b", "a"]  # the verifier drains first
    assert all(c.proc.returncode == 0 for c in supervisor.children)
    assert signal.getsignal(sig) is before
