"""Batch-1 speculation with fixed k, against no speculation, the analytic optimum and HF assisted generation.

    python benchmarks/speculation.py [--draft smollm2-draft | --ngram] [--grounded] [--in-process] [--quick]

The target (SmolLM2-135M) runs in this process through `Engine.step()`; drafts
come over gRPC from `smartspec proposer` in its own process, as in production.
For each k = 1..8 it measures time per output token (TPOT), the acceptance rate
a (tested-token counting: accepted / (accepted + steps with a rejection)), the
draft/target step-cost ratio c and the hop overhead r (both per target step).
The analytic speedup of k is E(k) / (1 + k c + r) with E(k) = (1 - a^(k+1)) / (1 - a);
the best fixed k is compared with the best analytic k. Hugging Face assisted
generation (`assistant_model=` the same draft, or `prompt_lookup_num_tokens=`
for n-gram) runs on the same prompts for comparison. Last, the `smartspec`
policy runs on the same prompts, its planner having learned costs and acceptance
from the fixed-k runs before it. `--grounded` uses passage rewrites (the
n-gram workload of the goodput sweep) instead of the default prompts.
`--in-process` drafts in this process, as `smartspec verifier --proposer
draft:MODEL` does on one node: no hop, no second process on the same cores.
Our draft uses its head vocabulary (`proposer_svc/head_vocab.py`) unless
`--full-head`; HF's assistant always computes the whole vocabulary.
`--device cuda --dtype bfloat16` runs both models on a GPU (the proposer
process too); the CPU-linear HF column is then left out.

Shared cores drift over minutes, so every configuration runs once per round
(`--rounds`, default 3): off first, each k followed by HF's same k, smartspec
last. A TPOT is the median over rounds; a speedup is the median of each round's
off / that round's TPOT.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proposer_svc.server import BUILTIN_DRAFT, ProposerConfig, builtin_draft_dir  # noqa: E402
from proposer_svc.servicer import NgramBackend  # noqa: E402
from smartspec.models import load_model, load_tokenizer  # noqa: E402
from smartspec.prompts import GROUNDED_PROMPTS  # noqa: E402
from smartspec.up import wait_serving  # noqa: E402
from verifier_svc.cpu_linear import use_cpu_linear  # noqa: E402
from verifier_svc.engine import Engine, EngineConfig  # noqa: E402
from verifier_svc.local_proposer import LocalProposer  # noqa: E402
from verifier_svc.planner import Policy  # noqa: E402
from verifier_svc.proposer_client import ProposerClient  # noqa: E402
from verifier_svc.sampler import SamplingParams  # noqa: E402

PROMPTS = [  # code and input-grounded prompts, chat-templated like real traffic
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python class for a stack with push, pop and peek.",
    "Rewrite in the past tense: The engineer opens the dashboard and checks the latency of every request.",
    "Summarise in one sentence: The cache stores keys and values of earlier tokens so that each new token "
    "attends to them without recomputing them, which makes decoding fast but uses memory.",
]


HF_KEYS = ("hf_tpot_ms", "hf_cpu_linear_tpot_ms")  # HF assisted: stock linear layers, the engine's CPU ones


class TimedProposer:
    """Times each exchange for Engine.step() (synchronous) and keeps the drafting time the proposer
    reported; drives the async gRPC client on a loop of its own."""

    def __init__(self, proposer):
        self.proposer = proposer
        self.loop = asyncio.new_event_loop()
        self.exchange_ms: list[float] = []
        self.draft_ms: list[float] = []
        self.drafted: list[int] = []  # lockstep draft forwards per exchange: the longest draft

    def propose(self, requests):
        start = time.perf_counter()
        drafts = self.proposer.propose(requests)
        if asyncio.iscoroutine(drafts):
            drafts = self.loop.run_until_complete(drafts)
        self.exchange_ms.append((time.perf_counter() - start) * 1e3)
        self.draft_ms.append(self.proposer.last_draft_ms)
        self.drafted.append(max((len(d.token_ids) for d in drafts if d is not None), default=0))
        return drafts

    @property
    def last_draft_ms(self) -> float:
        """Drafting time the proposer reported for the last exchange (what the engine's cost fit reads)."""
        return self.proposer.last_draft_ms

    def release(self, request_ids):
        self.proposer.release(request_ids)


def run_engine(engine: Engine, prompt_ids: list[list[int]], new_tokens: int, k: int | None) -> dict:
    """Sequential batch-1 requests; TPOT excludes the first token (prefill). k None: the server's policy."""
    tpots, accepted, tested = [], 0, 0
    mode = "auto" if k is None else "fixed" if k else "off"
    for i, ids in enumerate(prompt_ids):
        engine.add_request(f"k{k}-{i}-{time.monotonic()}", ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                           spec_mode=mode, spec_k=k or 0)
        first = None
        while engine.has_work():
            engine.step()
            first = first or time.perf_counter()
            for _, proposed, acc in engine.last_stats.drafts:
                accepted += acc
                tested += acc + (acc < proposed)
        tpots.append((time.perf_counter() - first) / (new_tokens - 1) * 1e3)
    return {"k": k, "tpot_ms": statistics.mean(tpots), "acceptance": accepted / tested if tested else None}


def synchronize(model) -> None:
    """Waits for the model's queued kernels (a no-op on CPU), so that wall-clock timers are honest."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_assisted(target, tok, draft, prompts: list[str], new_tokens: int, k: int, ngram: bool) -> float | None:
    if target is None:
        return None
    tpots = []
    device = next(target.parameters()).device
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True).to(device)
        kwargs = {"prompt_lookup_num_tokens": k} if ngram else {"assistant_model": draft}
        if not ngram:
            draft.generation_config.num_assistant_tokens = k
            draft.generation_config.num_assistant_tokens_schedule = "constant"
        with torch.inference_mode():
            t0 = time.perf_counter()
            target.generate(**ids, max_new_tokens=1, do_sample=False)
            synchronize(target)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = target.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  **kwargs)
            synchronize(target)
            total = time.perf_counter() - t0
        n = out.shape[1] - ids["input_ids"].shape[1]
        tpots.append((total - ttft) / (n - 1) * 1e3)
    return statistics.mean(tpots)


def fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}"


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def analytic(a: float, k: int, c: float, r: float) -> float:
    expected = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return expected / (1 + k * c + r)


def measure_round(engine, proposer, ids, prompts, new_tokens, ks, tok, hf_models, ngram: bool, n: int) -> dict:
    """One pass over every configuration, off first and smartspec last; HF's k right after ours."""
    off = run_engine(engine, ids, new_tokens, 0)
    rows = []
    for k in ks:
        proposer.exchange_ms.clear()
        proposer.draft_ms.clear()
        proposer.drafted.clear()
        row = run_engine(engine, ids, new_tokens, k)
        # One forward per drafted position (the first also catches up); fewer than k after a confidence stop.
        row["draft_step_ms"] = statistics.median(ms / d for ms, d in zip(proposer.draft_ms, proposer.drafted) if d)
        row["hop_ms"] = statistics.median(e - d for e, d in zip(proposer.exchange_ms, proposer.draft_ms))
        for key, (target, draft) in hf_models.items():
            row[key] = hf_assisted(target, tok, draft, prompts, new_tokens, k, ngram)
        rows.append(row)
        print(f"round {n} k={k}: TPOT {row['tpot_ms']:.1f} ms (off {off['tpot_ms']:.1f}), a={row['acceptance']}, "
              f"draft step {row['draft_step_ms']:.2f} ms, hop {row['hop_ms']:.2f} ms, HF assisted "
              f"{fmt(row['hf_tpot_ms'])} ms ({fmt(row['hf_cpu_linear_tpot_ms'])} ms with CPU linear)", flush=True)
    engine.planner.policy = Policy.parse("smartspec")
    smart = run_engine(engine, ids, new_tokens, None)
    engine.planner.policy = Policy()
    print(f"round {n} smartspec: TPOT {smart['tpot_ms']:.1f} ms, a={smart['acceptance']}", flush=True)
    return {"off": off, "rows": rows, "smartspec": smart}


def median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise_rounds(rounds: list[dict], ks: list[int]) -> tuple[dict, list[dict], dict]:
    """Per configuration: the median over rounds of TPOT, and of the speedup paired with the same round's off."""
    off_ms = [r["off"]["tpot_ms"] for r in rounds]
    off = {"k": 0, "tpot_ms": statistics.median(off_ms), "tpot_ms_rounds": off_ms}

    def merged(runs: list[dict]) -> dict:
        return {"tpot_ms": statistics.median(x["tpot_ms"] for x in runs),
                "tpot_ms_rounds": [x["tpot_ms"] for x in runs],
                "speedup": statistics.median(o / x["tpot_ms"] for o, x in zip(off_ms, runs)),
                "acceptance": median_or_none(x["acceptance"] for x in runs)}

    rows = []
    for i, k in enumerate(ks):
        runs = [r["rows"][i] for r in rounds]
        row = {"k": k, **merged(runs)}
        row["c"] = statistics.median(x["draft_step_ms"] / o for o, x in zip(off_ms, runs))
        row["r"] = statistics.median(x["hop_ms"] / o for o, x in zip(off_ms, runs))
        for key in HF_KEYS:
            row[key] = median_or_none(x[key] for x in runs)
            row[key + "_rounds"] = [x[key] for x in runs]
        rows.append(row)
    smart = {"k": None, **merged([r["smartspec"] for r in rounds])}
    return off, rows, smart


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--draft", default=BUILTIN_DRAFT)
    kind.add_argument("--ngram", action="store_true")
    ap.add_argument("--quick", action="store_true", help="k in 1..3, 2 prompts, 24 tokens")
    ap.add_argument("--grounded", action="store_true", help="passage rewrites instead of the default prompts")
    ap.add_argument("--in-process", action="store_true",
                    help="draft in this process (`verifier --proposer draft:MODEL` / `ngram`) instead of over gRPC")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--target", default="smollm2", help="target model: 'smollm2', a .gguf file or a directory")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (both models, the proposer's too)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--min-confidence", type=float, default=0.0,
                    help="a draft stops after a position where the draft's most likely token had less than "
                         "this probability (HF assisted keeps its own threshold)")
    ap.add_argument("--full-head", action="store_true",
                    help="our draft over the whole vocabulary instead of its head vocabulary (as HF's always is)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="passes over every configuration; TPOTs are medians, speedups paired with each round's off")
    ap.add_argument("--stock-hf", action="store_true",
                    help="on CPU, also time HF assisted with stock linear layers (always on a GPU)")
    ap.add_argument("--port", type=int, default=50681)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    ks = [1, 2, 3] if args.quick else list(range(1, 9))
    prompts = GROUNDED_PROMPTS[:4] if args.grounded else PROMPTS
    prompts = prompts[:2] if args.quick else prompts
    new_tokens = 24 if args.quick else args.new_tokens
    name = (("ngram" if args.ngram else Path(args.draft).name) + ("_grounded" if args.grounded else "")
            + ("_in_process" if args.in_process else "")
            + (f"_conf{args.min_confidence:g}" if args.min_confidence and not args.ngram else "")
            + ("_full_head" if args.full_head and not args.ngram else ""))
    out_dir = Path(args.output_dir or f"benchmarks/results/speculation_{name}")

    kind_args = ["--ngram"] if args.ngram else ["--draft", args.draft, "--min-confidence", str(args.min_confidence),
                                                "--full-head" if args.full_head else "--no-full-head"]
    # One thread: the proposer shares these cores with the target (see `smartspec up --proposer-threads`).
    proc = None if args.in_process else subprocess.Popen(
        [sys.executable, "-m", "smartspec.cli", "proposer", *kind_args, "--port", str(args.port), "--threads", "1",
         "--device", args.device, "--dtype", args.dtype])

    try:  # the proposer process goes down with this one, whatever fails
        def load(model: str):
            return load_model(model, args.dtype, args.device)

        tok = load_tokenizer(args.target)
        on_cpu = torch.device(args.device).type == "cpu"
        stock_hf = args.stock_hf or not on_cpu
        target_for_engine = load(args.target)
        target_for_hf = load(args.target) if stock_hf else None
        draft_path = builtin_draft_dir() if args.draft == BUILTIN_DRAFT else args.draft
        draft_for_hf = None if args.ngram or not stock_hf else load(draft_path)
        # HF with the engine's CPU linear layers: like for like on the kernels, so it compares the speculation.
        fast_target = load(args.target) if on_cpu else None
        fast_draft = load(draft_path) if on_cpu and not args.ngram else None
        for m in (fast_target, fast_draft):
            if m is not None:
                use_cpu_linear(m)
        if args.in_process:
            backend = NgramBackend() if args.ngram else ProposerConfig(
                draft=args.draft, dtype=args.dtype, device=args.device, kv_cache_tokens=8192,
                min_confidence=args.min_confidence, full_head=args.full_head).make_backend()
            proposer = TimedProposer(LocalProposer(backend))
        else:
            wait_serving(args.port, proc, 120)
            proposer = TimedProposer(ProposerClient([f"127.0.0.1:{args.port}"], deadline_s=5.0))
        engine = Engine(target_for_engine, tok, EngineConfig(kv_cache_tokens=8192, policy=Policy()), proposer)
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in prompts]
        run_engine(engine, ids[:1], 8, 2)  # warm-up
        hf_models = dict(zip(HF_KEYS, ((target_for_hf, draft_for_hf), (fast_target, fast_draft))))
        for target, draft in hf_models.values():
            hf_assisted(target, tok, draft, prompts[:1], 8, 2, args.ngram)
        rounds = [measure_round(engine, proposer, ids, prompts, new_tokens, ks, tok, hf_models, args.ngram, n)
                  for n in range(1, args.rounds + 1)]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    off, rows, smart = summarise_rounds(rounds, ks)
    measured = [r for r in rows if r["acceptance"] is not None]
    a = statistics.median(r["acceptance"] for r in measured) if measured else 0.0
    c = statistics.median(r["c"] for r in rows)
    r_hop = statistics.median(r["r"] for r in rows)
    optimum = max(analytic(a, k, c, r_hop) for k in ks)
    best = max(rows, key=lambda r: r["speedup"])
    summary = {"acceptance": a, "c": c, "r": r_hop, "analytic_optimum": optimum, "best_k": best["k"],
               "best_speedup": best["speedup"], "fraction_of_optimum": best["speedup"] / optimum,
               "best_tpot_ms": best["tpot_ms"],
               **{f"best_{key}": min((r[key] for r in rows if r[key] is not None), default=None) for key in HF_KEYS},
               "smartspec_tpot_ms": smart["tpot_ms"], "smartspec_speedup": smart["speedup"],
               "smartspec_fraction_of_optimum": smart["speedup"] / optimum,
               "smartspec_fraction_of_best_fixed": smart["speedup"] / max(best["speedup"], 1.0)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "device": device_name(args.device), "dtype": args.dtype,
        "proposer": name, "new_tokens": new_tokens, "rounds": args.rounds, "off": off, "rows": rows, "smartspec": smart,
        "summary": summary}, indent=1))
    print("\n| k | TPOT (ms) | speedup vs off | acceptance | analytic speedup | HF assisted TPOT (ms) "
          "| HF assisted, CPU linear (ms) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| off | {off['tpot_ms']:.1f} | 1.00 | - | 1.00 | - | - |")
    for row in rows:
        print(f"| {row['k']} | {row['tpot_ms']:.1f} | {row['speedup']:.2f} | "
              f"{row['acceptance'] if row['acceptance'] is None else round(row['acceptance'], 3)} | "
              f"{analytic(a, row['k'], c, r_hop):.2f} | {fmt(row['hf_tpot_ms'])} | {fmt(row['hf_cpu_linear_tpot_ms'])} |")
    print(f"\na = {a:.3f}, c = {c:.3f}, r = {r_hop:.4f}; analytic optimum {optimum:.2f}x; best fixed k = "
          f"{best['k']} at {best['speedup']:.2f}x = {summary['fraction_of_optimum']:.0%} of it; "
          f"best HF assisted TPOT {fmt(summary['best_hf_tpot_ms'])} ms "
          f"({fmt(summary['best_hf_cpu_linear_tpot_ms'])} ms with CPU linear) vs ours {best['tpot_ms']:.1f} ms; "
          f"smartspec {smart['tpot_ms']:.1f} ms = {smart['speedup']:.2f}x, "
          f"{summary['smartspec_fraction_of_optimum']:.0%} of the analytic optimum, "
          f"{summary['smartspec_fraction_of_best_fixed']:.0%} of max(best fixed k, off)")


if __name__ == "__main__":
    main()
