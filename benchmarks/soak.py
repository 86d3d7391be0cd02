"""Soak: thousands of mixed requests against the local stack (`smartspec up`), watching every
process's memory and checking that nothing is left behind.

    python benchmarks/soak.py [--requests 2000] [--concurrency 8] [--replicas 2] [--draft]

The mix (seeded): greedy and sampled (temperature, top-p, top-k, seeds), stop strings, a
server-side speculation policy or a request's own (off, fixed k), clients that cancel after
their first chunk, and malformed requests. What the load asked for is expected: a cancel ends
CANCELLED, a malformed request INVALID_ARGUMENT; anything else is an error.

Pass/fail: no unexpected error; each process's resident memory at the end within 5% of what it
was after warm-up (the first tenth of the requests); once idle, the verifier's KV cache and
running/waiting queues and every proposer's draft states back at zero. Writes results.json
and rss.png (memory of each process over the run); exits 1 on a failed check.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import psutil  # noqa: E402
from machine import machine_info  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from protocol.v1 import generation_pb2 as pb  # noqa: E402
from protocol.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from smartspec.prompts import BUILTIN_PROMPTS, GROUNDED_PROMPTS  # noqa: E402

RSS_GROWTH_BOUND = 0.05


def free_port_block(n: int) -> int:
    """The first of n consecutive ports that are free now, below the kernel's ephemeral range:
    the stack's processes bind theirs one after another while others already connect out, and
    an outgoing connection can take a free port of that range as its local end."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except OSError:  # not Linux: IANA's dynamic range
        ephemeral = 49152
    rng = random.Random()
    for _ in range(1000):
        first = rng.randrange(10000, ephemeral - n)
        if all(_free(first + i) for i in range(n)):
            return first
    raise RuntimeError(f"no {n} free consecutive ports below {ephemeral}")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def request_mix(i: int, rng: random.Random, max_new_tokens: int) -> tuple[pb.GenerateRequest, str]:
    """A request and what it should end with: 'ok', 'cancel' or 'invalid'."""
    prompt = rng.choice(BUILTIN_PROMPTS + GROUNDED_PROMPTS)
    req = pb.GenerateRequest(request_id=f"soak-{i}", prompt_text=prompt, max_new_tokens=rng.randint(4, max_new_tokens))
    req.chat = rng.random() < 0.5
    if rng.random() < 0.5:
        req.sampling.temperature = rng.choice([0.6, 0.8, 1.0])
        req.sampling.top_p = rng.choice([0.9, 1.0])
        req.sampling.top_k = rng.choice([0, 50])
        if rng.random() < 0.5:
            req.sampling.seed = rng.randrange(1 << 32)
    if rng.random() < 0.2:
        req.stop.extend(rng.sample(["\n\n", ".", " the", ","], 2))
    mode = rng.random()
    if mode < 0.25:
        req.speculation.mode = pb.SPECULATION_MODE_OFF
    elif mode < 0.5:
        req.speculation.mode = pb.SPECULATION_MODE_FIXED
        req.speculation.k = rng.randint(1, 4)
    kind = rng.random()
    if kind < 0.03:
        req.sampling.temperature = -1.0  # refused, naming the field
        return req, "invalid"
    return req, "cancel" if kind < 0.13 else "ok"


def run_one(stub, req: pb.GenerateRequest, expect: str) -> str:
    """The outcome: 'ok', 'cancelled', or a status code's name."""
    try:
        stream = stub.Generate(req, timeout=300)
        if expect == "cancel":
            next(stream)
            stream.cancel()
            return "cancelled"
        chunks = list(stream)
        return "ok" if chunks and chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED else "no final chunk"
    except grpc.RpcError as exc:
        return "cancelled" if exc.code() == grpc.StatusCode.CANCELLED and expect == "cancel" else exc.code().name
    except StopIteration:
        return "empty stream"


def scrape(port: int) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, *sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


class Stack:
    """`smartspec up` as a child process, and its children by role."""

    def __init__(self, args, ports: int):
        self.port, self.metrics_port = ports, ports + 10
        cmd = [sys.executable, "-m", "smartspec.cli", "up", "--replicas", str(args.replicas),
               "--port", str(ports), "--controller-port", str(ports + 1), "--proposer-port", str(ports + 2),
               "--metrics-port", str(self.metrics_port), "--policy", args.policy, "--cost-profile", args.cost_profile,
               *([] if args.draft else ["--ngram"])]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.ended = False  # its output closed: it exited
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(args.startup_timeout) or self.ended:
            code = self.stop()
            raise RuntimeError(f"the stack did not come up (exit {code}):\n" + "".join(self.log[-40:]))
        self.roles = self._roles()

    def _read(self, ready: threading.Event) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if "smartspec stack up" in line:
                ready.set()
        self.ended = True
        ready.set()  # a stack that exits before it is up is reported now, not at the timeout

    def _roles(self) -> dict[str, psutil.Process]:
        roles = {}
        for child in psutil.Process(self.proc.pid).children():
            argv = child.cmdline()
            role = next((r for r in ("verifier", "controller", "proposer") if r in argv), None)
            if role == "proposer":
                role = f"proposer:{argv[argv.index('--port') + 1]}"
            if role:
                roles[role] = child
        return roles

    def rss_mib(self) -> dict[str, float]:
        return {role: p.memory_info().rss / 2**20 for role, p in self.roles.items()}

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def soak(args) -> dict:
    stack = Stack(args, free_port_block(12))
    try:
        result = _soak(args, stack)
    finally:
        exit_code = stack.stop()
    # The stack drains on SIGTERM and exits 0: anything else is a failure the load caused.
    result["checks"]["the stack stops cleanly"] = exit_code == 0
    result["passed"] = all(result["checks"].values())
    return result


def _soak(args, stack: Stack) -> dict:
    rng = random.Random(args.seed)
    mix = [request_mix(i, rng, args.max_new_tokens) for i in range(args.requests)]
    warmup = max(1, args.requests // 10)
    outcomes: list[tuple[str, str]] = [("", "")] * len(mix)
    series: list[dict] = []
    baseline: dict[str, float] = {}
    done = [0]
    start = time.monotonic()
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(args.sample_every_s):
            series.append({"t": time.monotonic() - start, "done": done[0], "rss_mib": stack.rss_mib()})

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
        stub = pb_grpc.GenerationStub(channel)

        def work(i: int) -> None:
            req, expect = mix[i]
            outcomes[i] = (expect, run_one(stub, req, expect))
            done[0] += 1
            if done[0] == warmup:
                baseline.update(stack.rss_mib())

        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(work, range(len(mix))))
    elapsed = time.monotonic() - start
    time.sleep(args.settle_s)  # idle: releases flushed, gauges updated
    stop_sampling.set()
    sampler.join()
    final = stack.rss_mib()
    verifier = scrape(stack.metrics_port)
    proposer_roles = sorted(r for r in stack.roles if r.startswith("proposer"))  # by port: the metrics ports' order
    proposers = {role: scrape(stack.metrics_port + 2 + i) for i, role in enumerate(proposer_roles)}
    expected = {"ok": "ok", "cancel": "cancelled", "invalid": grpc.StatusCode.INVALID_ARGUMENT.name}
    unexpected = [(mix[i][0].request_id, want, got) for i, (want, got) in enumerate(outcomes) if expected[want] != got]
    counts: dict[str, int] = {}
    for want, got in outcomes:
        counts[f"{want}->{got}"] = counts.get(f"{want}->{got}", 0) + 1
    growth = {role: final[role] / baseline[role] - 1 for role in final}
    leftovers = {
        "kv_usage": verifier[("smartspec_kv_cache_usage_perc",)],
        "running": verifier[("smartspec_num_requests_running",)],
        "waiting": verifier[("smartspec_num_requests_waiting",)],
        **{f"{role} states": m[("smartspec_proposer_states",)] for role, m in proposers.items()},
    }
    checks = {
        "no unexpected outcome": not unexpected,
        f"rss growth <= {RSS_GROWTH_BOUND:.0%}": all(g <= RSS_GROWTH_BOUND for g in growth.values()),
        "nothing left behind": all(v == 0 for v in leftovers.values()),
    }
    return {
        "machine": machine_info(),
        "config": vars(args),
        "seconds": elapsed,
        "requests_per_s": len(mix) / elapsed,
        "outcomes": counts,
        "unexpected": unexpected[:50],
        "rss_mib": {"after_warmup": baseline, "final": final, "growth": growth},
        "leftovers": leftovers,
        "proposer_evictions": {
            role: {k[1][1]: v for k, v in m.items() if k[0] == "smartspec_proposer_states_evicted_total"}
            for role, m in proposers.items()
        },
        "checks": checks,
        "passed": all(checks.values()),
        "series": series,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for role in result["rss_mib"]["final"]:
        points = [(s["done"], s["rss_mib"][role]) for s in result["series"] if role in s["rss_mib"]]
        ax.plot([d for d, _ in points], [m for _, m in points], label=role)
    ax.axvline(max(1, result["config"]["requests"] // 10), color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("requests finished")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"Soak: {result['config']['requests']} mixed requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--replicas", type=int, default=2, help="proposer processes")
    parser.add_argument("--draft", action="store_true", help="draft-model proposers (default: n-gram)")
    parser.add_argument("--policy", default="smartspec")
    parser.add_argument("--cost-profile", default="calibrate", help="the verifier's --cost-profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-every-s", type=float, default=2.0)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--output-dir", default="benchmarks/results/soak")
    args = parser.parse_args(argv)
    result = soak(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "rss.png")
    print(json.dumps({k: result[k] for k in ("seconds", "outcomes", "rss_mib", "leftovers", "checks")}, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
