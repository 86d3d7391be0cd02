"""Verifier, proposer and controller on three hosts: separate Linux network namespaces joined by
a bridge, so every hop crosses a real (virtual) link that can be cut or slowed.

Needs root and iproute2 (`ip netns`, a bridge); skipped with the reason where namespaces cannot
be made. Delay needs the kernel's netem queueing discipline (`tc qdisc ... netem`); the test
that needs it is skipped, naming why, on kernels without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
SUBNET = "10.78.{}.{}"
HOSTS = {"verifier": 1, "proposer": 2, "controller": 3}


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def netem_unavailable() -> str | None:
    """Why a netem delay cannot be added here (None: it can)."""
    probe = f"smartspec-netem-{os.getpid()}"
    sh("ip", "netns", "add", probe)
    try:
        sh("ip", "-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1", check=False)
        added = sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "probe0", "root", "netem",
                   "delay", "1ms", check=False)  # fmt: skip
        return None if added.returncode == 0 else f"this kernel has no netem queueing discipline: {added.stderr}"
    finally:
        sh("ip", "netns", "del", probe, check=False)


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"smartspec-probe-{os.getpid()}"
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


class Hosts:
    """One namespace per service, each with a veth into a bridge in this namespace (which the
    test's client uses); `cut` and `delay` act on one host's link."""

    def __init__(self, net: int):
        self.tag, self.net = f"ss{os.getpid() % 100000}", net
        self.bridge = f"{self.tag}br"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", SUBNET.format(net, 254) + "/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for name, host in HOSTS.items():
            ns, outside, inside = self.ns(name), f"{self.tag}{host}o", f"{self.tag}{host}i"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            sh("ip", "link", "set", inside, "netns", ns)
            sh("ip", "link", "set", outside, "master", self.bridge)
            sh("ip", "link", "set", outside, "up")
            sh("ip", "-n", ns, "addr", "add", self.address(name) + "/24", "dev", inside)
            sh("ip", "-n", ns, "link", "set", inside, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def address(self, name: str) -> str:
        return SUBNET.format(self.net, HOSTS[name])

    def link(self, name: str) -> str:
        return f"{self.tag}{HOSTS[name]}i"

    def cut(self, name: str, seconds: float) -> None:
        sh("ip", "-n", self.ns(name), "link", "set", self.link(name), "down")
        time.sleep(seconds)
        sh("ip", "-n", self.ns(name), "link", "set", self.link(name), "up")

    def delay(self, name: str, ms: float) -> subprocess.CompletedProcess:
        return sh(
            "ip", "netns", "exec", self.ns(name), "tc", "qdisc", "add", "dev", self.link(name), "root",
            "netem", "delay", f"{ms}ms", check=False,
        )  # fmt: skip

    def run(self, name: str, *argv: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns(name), sys.executable, "-m", "smartspec.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def remove(self) -> None:
        for name in HOSTS:
            sh("ip", "netns", "del", self.ns(name), check=False)
        sh("ip", "link", "del", self.bridge, check=False)


@pytest.fixture
def stack():
    """The three services, each in its own namespace; yields (hosts, verifier address)."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    hosts = Hosts(net=os.getpid() % 200 + 20)
    procs = []
    try:
        procs.append(hosts.run("proposer", "proposer", "--ngram", "--host", hosts.address("proposer"),
                               "--port", "50061"))  # fmt: skip
        procs.append(hosts.run("controller", "controller", "--host", hosts.address("controller"), "--port",
                               "50071", "--metrics-port", "0", "--policy", "fixed:3"))  # fmt: skip
        procs.append(
            hosts.run(
                "verifier", "verifier", "--model", "smollm2", "--host", hosts.address("verifier"),
                "--port", "50051", "--metrics-port", "9400", "--kv-cache-tokens", "8192",
                "--proposer", f"{hosts.address('proposer')}:50061", "--proposer-deadline-ms", "500",
                "--controller", f"{hosts.address('controller')}:50071", "--policy", "fixed:3",
                "--cost-profile", "none",
            )
        )  # fmt: skip
        target = f"{hosts.address('verifier')}:50051"
        wait_ready(target, procs)
        yield hosts, target
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        hosts.remove()


def wait_ready(target: str, procs, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while time.monotonic() < deadline:
            for proc in procs:
                assert proc.poll() is None, proc.stdout.read()
            try:
                list(stub.Generate(pb.GenerateRequest(prompt_text="ready?", max_new_tokens=1), timeout=2))
                return
            except grpc.RpcError:
                time.sleep(0.5)
    raise AssertionError("the verifier did not answer")


# The built-in model continues these by repeating them: prompt lookup drafts, and drafts pass.
PROMPTS = [f"Repeat after me, {i}: red green blue, red green blue, red green blue," for i in range(4)]


def generate(stub, prompt: str, off: bool = False) -> list[int]:
    request = pb.GenerateRequest(prompt_text=prompt, max_new_tokens=24, ignore_eos=True)
    if off:
        request.speculation.mode = pb.SPECULATION_MODE_OFF
    return [t for chunk in stub.Generate(request, timeout=60) for t in chunk.token_ids]


def metric(host: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://{host}:9400/metrics", timeout=5).read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def test_a_partitioned_proposer_costs_drafts_only(stack):
    """The proposer's link goes down for 100 ms, then for 1 s, under load: every request finishes
    with the target's own greedy output (speculation off gives it), drafting resumes after."""
    hosts, target = stack
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with ThreadPoolExecutor(4) as pool:
            reference = list(pool.map(lambda p: generate(stub, p, off=True), PROMPTS))
            outputs = pool.map(lambda p: generate(stub, p), PROMPTS * 2)
            hosts.cut("proposer", 0.1)
            time.sleep(0.2)
            hosts.cut("proposer", 1.0)
            assert list(outputs) == reference * 2
        drafts = metric(hosts.address("verifier"), "smartspec_spec_decode_num_draft_tokens_total")
        deadline = time.monotonic() + 20  # past the proposer's back-off
        while metric(hosts.address("verifier"), "smartspec_spec_decode_num_draft_tokens_total") == drafts:
            assert time.monotonic() < deadline, "drafting did not resume after the partition"
            assert generate(stub, PROMPTS[0]) == reference[0]
        assert metric(hosts.address("verifier"), "smartspec_proposer_failures_total") >= 1


@pytest.fixture
def netem():
    reason = netns_unavailable() or netem_unavailable()
    if reason:
        pytest.skip(reason.strip())


def test_the_proposers_network_delay_shows_in_the_propose_time(netem, stack):
    """netem adds 20 ms to every packet the proposer sends: each step's proposal, as the
    verifier times it (and reports to the controller's cost model), carries that hop."""
    hosts, target = stack
    assert hosts.delay("proposer", 20).returncode == 0
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        generate(stub, PROMPTS[0])
        host = hosts.address("verifier")
        total = metric(host, "smartspec_step_seconds_sum", phase="propose")
        count = metric(host, "smartspec_step_seconds_count", phase="propose")
        assert count > 0 and total / count >= 0.020
