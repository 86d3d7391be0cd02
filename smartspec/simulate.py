"""`smartspec simulate`: the rate x policy sweep of `smartspec bench --rates/--policies`, on a
virtual clock, with the engine's own step loop and a measured cost profile in place of the
models (`simulator`). Same points, same table, same figures as the live sweep, so the two
overlay; what is simulated is the model's time (the profile) and the acceptance of drafts
(a per-request random process, or each request's as a live run traced it).

From a live run: `--steps` takes a verifier's step log (`--step-log`) for the profile, the
proposer's cost, the host's work per step and the engine's settings; `--trace` replays a live
sweep's requests with their own acceptance. At scale: `--verifiers`, `--proposers`,
`--outage` simulate a fleet sharing proposer replicas.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from controller.policy import Policy
from controller.profile import load_profile, read_step_log
from simulator import trace
from simulator.acceptance import AcceptanceModel
from simulator.model import DraftCost, Outage
from simulator.peers import PEERS
from simulator.run import Fleet, Workload, simulate
from smartspec.bench import positive_float
from smartspec.sweep import markdown_table, plot


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="cost profile: rows {B, q, ctx, ms} (PATH or PATH#model)")
    source.add_argument(
        "--steps",
        help="a verifier's step log (smartspec verifier --step-log): profile, proposer cost, host work per step "
        "and engine settings (instead of --profile, --draft-*, --hop-ms)",
    )
    p.add_argument(
        "--trace",
        help="a live sweep's results (smartspec bench --rates): replay each of its runs' requests with their own "
        "traced acceptance (instead of --rates, --num-requests, lengths, --acceptance)",
    )
    p.add_argument("--rates", default="1,2,4", help="request rates (requests/s), comma-separated")
    p.add_argument(
        "--policies",
        default="off,fixed:1,fixed:3,smartspec",
        help="comma-separated: off | fixed:K | smartspec[:KMAX] | smartspec-uniform[:KMAX], or a peer's: "
        + " | ".join(PEERS),
    )
    p.add_argument("--seeds", type=int, default=3, help="repetitions, each with its own seed")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--prompt-len", default="64:512", help="prompt tokens, uniform MIN:MAX")
    p.add_argument("--output-len", default="64:256", help="output tokens, uniform MIN:MAX")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    p.add_argument("--acceptance", type=float, default=0.7, help="mean per-request acceptance rate")
    p.add_argument("--acceptance-concentration", type=float, default=20.0, help="how alike requests are")
    p.add_argument("--draft-step-ms", type=float, default=1.0, help="draft time per lockstep step")
    p.add_argument("--draft-per-token-ms", type=float, default=0.0, help="draft time per drafted token")
    p.add_argument("--hop-ms", type=float, default=0.5, help="network hop per proposal (both ways)")
    p.add_argument(
        "--proposer-deadline-ms", type=float, default=100.0, help="as the verifier's; later drafts are dropped"
    )
    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--verifiers", type=int, default=1, help="verifiers sharing the load")
    fleet.add_argument("--proposers", type=int, default=1, help="proposer replicas shared by the verifiers")
    fleet.add_argument("--balance", default="round-robin", choices=["round-robin", "least-loaded"])
    fleet.add_argument(
        "--pin",
        default="request",
        choices=["request", "verifier"],
        help="spread drafting over replicas per request (the verifier's proposer client) or per verifier",
    )
    fleet.add_argument(
        "--outage", action="append", default=[], help="REPLICA:START:END (s): a proposer replica is down meanwhile"
    )
    fleet.add_argument(
        "--proposer-gpus", type=float, default=1.0, help="GPUs per proposer replica, for goodput per GPU (0: CPU)"
    )
    p.add_argument("--output", default="simulate.json", help="JSON of every point; figures beside it")


def length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 0 < lo_i <= hi_i:
        raise ValueError(f"length range must be MIN:MAX with 0 < MIN <= MAX, got {text!r}")
    return lo_i, hi_i


def outage(text: str) -> Outage:
    replica, start, end = text.split(":")
    o = Outage(int(replica), float(start), float(end))
    if o.replica < 0 or not 0 <= o.start_s < o.end_s:
        raise ValueError(f"outage must be REPLICA:START:END with 0 <= START < END, got {text!r}")
    return o


def point(requests, totals: dict, rate: float, policy: str, seed: int, wall_s: float, gpus: float) -> dict:
    """A sweep point as `smartspec bench --rates` writes one, plus what the simulation counted."""
    done = [r for r in requests if r.finish_s is not None]
    e2e = [1e3 * (r.finish_s - r.arrival_s) for r in done]
    tpot = [1e3 * (r.finish_s - r.first_token_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    proposed, accepted = sum(r.proposed for r in done), sum(r.accepted for r in done)
    span = max(r.finish_s for r in done) - min(r.arrival_s for r in requests) if done else 0.0
    throughput = sum(r.output_tokens for r in done) / span if span > 0 else None
    return {
        "rate": rate,
        "policy": policy,
        "repeat": seed,
        "mean_e2e_ms": float(np.mean(e2e)) if e2e else None,
        "p99_e2e_ms": float(np.percentile(e2e, 99)) if e2e else None,
        "mean_tpot_ms": float(np.mean(tpot)) if tpot else None,
        "acceptance": accepted / proposed if proposed else None,
        "proposed_tokens": proposed,
        "output_throughput": throughput,
        "goodput_per_gpu": throughput / gpus if throughput is not None else None,
        "errors": len(requests) - len(done),
        **totals,
        "wall_s": wall_s,
    }


def cases(args, rates: list[float], policies: list[str]):
    """(rate, seed, workload, acceptance) per run: replayed from a live sweep, or drawn."""
    if args.trace:
        sweep = json.loads(Path(args.trace).read_text())
        seen = {}
        for (rate, _, repeat), replay in trace.replays(sweep).items():
            seen.setdefault((rate, repeat), replay)
        return [(rate, rep, replay, trace.acceptance(sweep, rep)) for (rate, rep), replay in sorted(seen.items())]
    prompt_len, output_len = length_range(args.prompt_len), length_range(args.output_len)
    acceptance = AcceptanceModel(args.acceptance, args.acceptance_concentration)
    return [
        (rate, seed, Workload(rate, args.num_requests, prompt_len, output_len, args.burstiness), acceptance)
        for seed in range(args.seeds)
        for rate in rates
    ]


def run(args: argparse.Namespace) -> int:
    try:
        policies = args.policies.split(",")
        for p in policies:
            if p not in PEERS:
                Policy.parse(p)  # ValueError names what is wrong
        outages = tuple(outage(o) for o in args.outage)
        fleet = Fleet(args.verifiers, args.proposers, outages, args.balance, args.pin)
        engine = {}
        if args.steps:
            fit = trace.fit_step_log(read_step_log(args.steps), args.proposer_deadline_ms)
            profile, draft, engine = fit.profile, fit.draft, {"cache": fit.cache, "scheduler": fit.scheduler}
            engine["host_ms"] = fit.host_ms
        else:
            profile = load_profile(args.profile)  # interpolated as the planner's cost model does
            draft = DraftCost(args.draft_step_ms, args.draft_per_token_ms, args.hop_ms, args.proposer_deadline_ms)
        rates = [positive_float(r) for r in args.rates.split(",")]
        runs = cases(args, rates, policies)
        rates = sorted({rate for rate, *_ in runs})
    except (ValueError, OSError, KeyError) as e:
        raise SystemExit(f"smartspec simulate: {e}") from None
    gpus = args.verifiers + args.proposers * args.proposer_gpus
    points = []
    for rate, seed, workload, acceptance in runs:
        for policy in policies:
            start = time.perf_counter()
            requests, totals = simulate(profile, workload, policy, acceptance, draft, seed, fleet=fleet, **engine)
            points.append(point(requests, totals, rate, policy, seed, time.perf_counter() - start, gpus))
            p = points[-1]
            print(
                f"rate {rate}/s {policy:<18} seed {seed}: mean {p['mean_e2e_ms'] / 1e3:.2f} s,"
                f" {p['simulated_s'] / max(p['wall_s'], 1e-9):.0f}x real time",
                flush=True,
            )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    assumptions = {
        "profile": args.profile or args.steps,
        "trace": args.trace,
        "acceptance": None if args.trace else {"mean": args.acceptance, "concentration": args.acceptance_concentration},
        "draft": {"step_ms": draft.step_ms, "per_token_ms": draft.per_token_ms, "hop_ms": draft.hop_ms},
        "host_ms": engine.get("host_ms", 0.0),
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "burstiness": args.burstiness,
        "fleet": {**vars(fleet), "outages": [vars(o) for o in fleet.outages], "gpus": gpus},
    }
    record = {"rates": rates, "policies": policies, "repeats": args.seeds, "num_requests": args.num_requests}
    output.write_text(json.dumps({**record, "simulated": assumptions, "points": points}, indent=1) + "\n")
    print(markdown_table(points, rates, policies))
    pngs = plot(points, rates, policies, output.parent)
    print(f"wrote {output}, " + ", ".join(str(p) for p in pngs))
    return 0 if all(p["errors"] == 0 for p in points) else 1
