"""Request rate x policy sweeps: the latency-vs-rate figure, one line per policy.

Each point is one open-loop run of `bench.run_benchmark`. Policies are set on
the controller (`SetPolicy`, pushed to every verifier) so requests ask for
nothing themselves; without a controller only off and fixed:K can be compared,
as per-request overrides. The order of policies rotates with each repetition so
that none always runs first after a change of rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from controller.policy import Mode, Policy
from protocol.security import read_token
from protocol.v1 import controller_pb2_grpc
from smartspec import dial
from smartspec.bench import positive_float, run_benchmark
from smartspec.ctl import set_request
from smartspec.dial import Dial
from smartspec.prompts import load_prompts

POLICY_SETTLE_S = 0.5  # a pushed policy reaches verifiers in milliseconds; this is margin


def check_policies(policies: list[str], controller: str | None) -> None:
    for text in policies:
        policy = Policy.parse(text)  # ValueError names what is wrong
        if policy.mode in (Mode.SMARTSPEC, Mode.UNIFORM) and not controller:
            raise ValueError(f"policy {text!r} is set through the controller: give --controller")


async def set_policy(controller: str, policy: str, how: Dial = Dial()) -> None:
    async with how.aio_channel(controller) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        await stub.SetPolicy(set_request(policy), timeout=10, metadata=how.metadata)
    await asyncio.sleep(POLICY_SETTLE_S)


async def run_sweep(
    target: str,
    prompts: list[str],
    rates: list[float],
    policies: list[str],
    repeats: int,
    num_requests: int,
    max_new_tokens: int,
    chat: bool = True,
    controller: str | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    log=print,
    how: Dial = Dial(),
    admin: Dial = Dial(),
    endpoint: str = "grpc",
) -> list[dict]:
    """`how`: how to reach the target; `admin`: how to reach the controller (an admin token)."""
    check_policies(policies, controller)
    points = []
    for rate in rates:
        for rep in range(repeats):
            shift = rep % len(policies)
            for policy in policies[shift:] + policies[:shift]:
                if controller:
                    await set_policy(controller, policy, admin)
                started = time.monotonic()
                result = await run_benchmark(
                    target,
                    prompts,
                    rate,
                    num_requests,
                    max_new_tokens,
                    temperature,
                    chat,
                    speculation="auto" if controller else policy,
                    seed=seed + rep,
                    progress=False,
                    how=how,
                    endpoint=endpoint,
                )
                s = result["summary"]
                point = {
                    "rate": rate,
                    "policy": policy,
                    "repeat": rep,
                    "mean_e2e_ms": s["e2e_ms"]["mean"],
                    "p99_e2e_ms": s["e2e_ms"]["p99"],
                    "mean_tpot_ms": s["tpot_ms"]["mean"],
                    "acceptance": s["acceptance"],
                    "proposed_tokens": s["proposed_tokens"],
                    "output_throughput": s["output_throughput"],
                    "errors": s["errors"],
                    "requests": [_trace(r) for r in result["requests"]],
                    # Monotonic (system-wide) times: a verifier's step log lines up with them.
                    "started_at": started,
                    "ended_at": time.monotonic(),
                }
                points.append(point)
                log(
                    f"rate {rate}/s  {policy:<20} rep {rep}: mean {_s(point['mean_e2e_ms'])} s, "
                    f"p99 {_s(point['p99_e2e_ms'])} s, acceptance {_fmt(s['acceptance'])}, errors {s['errors']}"
                )
    return points


def _trace(record: dict) -> dict:
    """What a simulation needs to replay a request: when it was sent, its lengths, its rounds."""
    keys = ("send_s", "prompt_tokens", "completion_tokens", "e2e_ms", "ttft_ms", "rounds", "error")
    return {k: record[k] for k in keys}


def medians(points: list[dict], key: str) -> dict[tuple[float, str], float | None]:
    groups: dict[tuple[float, str], list[float]] = {}
    for p in points:
        groups.setdefault((p["rate"], p["policy"]), [])
        if p[key] is not None:
            groups[(p["rate"], p["policy"])].append(p[key])
    return {k: statistics.median(v) if v else None for k, v in groups.items()}


def markdown_table(points: list[dict], rates: list[float], policies: list[str]) -> str:
    """Median mean / p99 end-to-end latency per rate and policy, in seconds."""
    mean, p99 = medians(points, "mean_e2e_ms"), medians(points, "p99_e2e_ms")
    lines = [
        "| rate (req/s) | " + " | ".join(f"{p} mean / p99 (s)" for p in policies) + " |",
        "|---|" + "---|" * len(policies),
    ]
    for r in rates:
        lines.append(f"| {r} | " + " | ".join(f"{_s(mean[(r, p)])} / {_s(p99[(r, p)])}" for p in policies) + " |")
    return "\n".join(lines)


def plot(points: list[dict], rates: list[float], policies: list[str], out_dir: Path) -> list[Path]:
    """latency_vs_rate.png (mean) and p99_vs_rate.png, one line per policy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for key, name, title in (
        ("mean_e2e_ms", "latency_vs_rate.png", "mean end-to-end latency"),
        ("p99_e2e_ms", "p99_vs_rate.png", "p99 end-to-end latency"),
    ):
        fig = Figure(figsize=(6, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        m = medians(points, key)
        for policy in policies:
            ys = [m[(r, policy)] / 1e3 if m[(r, policy)] is not None else float("nan") for r in rates]
            ax.plot(rates, ys, marker="o", label=policy, linewidth=2.5 if policy.startswith("smartspec") else 1.2)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(f"{title} (s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(out_dir / name, dpi=110)
        paths.append(out_dir / name)
    return paths


def _s(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1e3:.2f}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def run(args: argparse.Namespace) -> int:
    """`smartspec bench --rates/--policies`: the sweep, its JSON and its figures."""
    rates = [positive_float(r) for r in (args.rates or str(args.rate)).split(",")]
    policies = (args.policies or args.speculation).split(",")
    try:
        how = dial.from_args(args)
        points = asyncio.run(
            run_sweep(
                args.target,
                load_prompts(args.prompts),
                rates,
                policies,
                args.repeats,
                args.num_requests,
                args.max_new_tokens,
                chat=args.chat,
                controller=args.controller,
                temperature=args.temperature,
                seed=args.seed,
                how=how,
                admin=replace(how, token=read_token(args.controller_token_file)),
                endpoint=args.endpoint,
            )
        )
    except ValueError as e:
        raise SystemExit(f"smartspec bench: {e}") from None
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "rates": rates,
                "policies": policies,
                "repeats": args.repeats,
                "num_requests": args.num_requests,
                "max_new_tokens": args.max_new_tokens,
                "prompts": args.prompts or "builtin",
                "points": points,
            },
            indent=1,
        )
        + "\n"
    )
    print(markdown_table(points, rates, policies))
    pngs = plot(points, rates, policies, output.parent)
    print(f"wrote {output}, " + ", ".join(str(p) for p in pngs))
    return 0 if all(p["errors"] == 0 for p in points) else 1
