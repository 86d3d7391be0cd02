"""Batch-1 speculation with fixed k, against no speculation, the analytic optimum and HF assisted generation.

    python benchmarks/speculation.py [--draft smollm2-draft | --ngram] [--grounded] [--in-process] [--quick]

The target (SmolLM2-135M) runs in this process through `Engine.step()`, as in
the verifier's serving loop; drafts
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
Our draft uses its head vocabulary (`drafting/head_vocab.py`) unless
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
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import device_name, hf_assisted, machine_info  # noqa: E402
from speculation_summary import HF_KEYS, fmt, median_or_none, write_summary  # noqa: E402

from controller.policy import Policy  # noqa: E402
from drafting.builtin import BUILTIN_DRAFT, resolve  # noqa: E402
from drafting.config import DraftConfig  # noqa: E402
from drafting.local import LocalProposer  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from runtime.cpu_linear_select import use_cpu_linear  # noqa: E402
from runtime.models import Placement, load_model, load_tokenizer  # noqa: E402
from runtime.sampler import SamplingParams  # noqa: E402
from smartspec.prompts import GROUNDED_PROMPTS  # noqa: E402
from smartspec.up import wait_serving  # noqa: E402
from verifier_svc.proposer_client import ProposerClient  # noqa: E402

PROMPTS = [  # code and input-grounded prompts, chat-templated like real traffic
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python class for a stack with push, pop and peek.",
    "Rewrite in the past tense: The engineer opens the dashboard and checks the latency of every request.",
    "Summarise in one sentence: The cache stores keys and values of earlier tokens so that each new token "
    "attends to them without recomputing them, which makes decoding fast but uses memory.",
]


STEPS = asyncio.Runner()  # one event loop drives every Engine.step() of the run


def run_engine(engine: Engine, prompt_ids: list[list[int]], new_tokens: int, k: int | None) -> dict:
    """Sequential batch-1 requests; TPOT excludes the first token (prefill). k None: the server's policy.
    Per step that drafted: the proposer's own drafting time per drafted position, and the rest of
    the wait (the hop)."""
    tpots, accepted, tested, draft_step_ms, hop_ms = [], 0, 0, [], []
    policy = None if k is None else Policy.fixed(k)
    for i, ids in enumerate(prompt_ids):
        engine.add_request(
            f"k{k}-{i}-{time.monotonic()}", ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), policy
        )
        first = None
        while engine.has_work():
            STEPS.run(engine.step())
            first = first or time.perf_counter()
            step = engine.last_step
            # One forward per drafted position (the first also catches up); fewer than k after a confidence stop.
            drafted = max((proposed for _, proposed, _ in step.drafts), default=0)
            if drafted:
                draft_step_ms.append(step.draft_ms / drafted)
            if step.propose_ms:
                hop_ms.append(step.propose_ms - step.draft_ms)
            for _, proposed, acc in step.drafts:
                accepted += acc
                tested += acc + (acc < proposed)
        tpots.append((time.perf_counter() - first) / (new_tokens - 1) * 1e3)
    return {
        "k": k,
        "tpot_ms": statistics.mean(tpots),
        "acceptance": accepted / tested if tested else None,
        "draft_step_ms": median_or_none(draft_step_ms),
        "hop_ms": median_or_none(hop_ms),
    }


def measure_round(engine, ids, prompts, new_tokens, ks, tok, hf_models, ngram: bool, n: int) -> dict:
    """One pass over every configuration, off first and smartspec last; HF's k right after ours."""
    off = run_engine(engine, ids, new_tokens, 0)
    rows = []
    for k in ks:
        row = run_engine(engine, ids, new_tokens, k)
        for key, (target, draft) in hf_models.items():
            row[key] = hf_assisted(target, tok, draft, prompts, new_tokens, k, ngram)
        rows.append(row)
        print(
            f"round {n} k={k}: TPOT {row['tpot_ms']:.1f} ms (off {off['tpot_ms']:.1f}), a={row['acceptance']}, "
            f"draft step {row['draft_step_ms']:.2f} ms, hop {row['hop_ms']:.2f} ms, HF assisted "
            f"{fmt(row['hf_tpot_ms'])} ms ({fmt(row['hf_cpu_linear_tpot_ms'])} ms with CPU linear)",
            flush=True,
        )
    engine.planner.policy = Policy.parse("smartspec")
    smart = run_engine(engine, ids, new_tokens, None)
    engine.planner.policy = Policy()
    print(f"round {n} smartspec: TPOT {smart['tpot_ms']:.1f} ms, a={smart['acceptance']}", flush=True)
    return {"off": off, "rows": rows, "smartspec": smart}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--draft", default=BUILTIN_DRAFT)
    kind.add_argument("--ngram", action="store_true")
    ap.add_argument("--quick", action="store_true", help="k in 1..3, 2 prompts, 24 tokens")
    ap.add_argument("--grounded", action="store_true", help="passage rewrites instead of the default prompts")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="draft in this process (`verifier --proposer draft:MODEL` / `ngram`) instead of over gRPC",
    )
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--target", default="smollm2", help="target model: 'smollm2', a .gguf file or a directory")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (both models, the proposer's too)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument(
        "--min-confidence",
        type=float,
        default=0.0,
        help="a draft stops after a position where the draft's most likely token had less than "
        "this probability (HF assisted keeps its own threshold)",
    )
    ap.add_argument(
        "--full-head",
        action="store_true",
        help="our draft over the whole vocabulary instead of its head vocabulary (as HF's always is)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="passes over every configuration; TPOTs are medians, speedups paired with each round's off",
    )
    ap.add_argument(
        "--stock-hf",
        action="store_true",
        help="on CPU, also time HF assisted with stock linear layers (always on a GPU)",
    )
    ap.add_argument("--port", type=int, default=50681)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    ks = [1, 2, 3] if args.quick else list(range(1, 9))
    prompts = GROUNDED_PROMPTS[:4] if args.grounded else PROMPTS
    prompts = prompts[:2] if args.quick else prompts
    new_tokens = 24 if args.quick else args.new_tokens
    name = (
        ("ngram" if args.ngram else Path(args.draft).name)
        + ("_grounded" if args.grounded else "")
        + ("_in_process" if args.in_process else "")
        + (f"_conf{args.min_confidence:g}" if args.min_confidence and not args.ngram else "")
        + ("_full_head" if args.full_head and not args.ngram else "")
    )
    out_dir = Path(args.output_dir or f"benchmarks/results/speculation_{name}")

    kind_args = (
        ["--ngram"]
        if args.ngram
        else [
            "--draft",
            args.draft,
            "--min-confidence",
            str(args.min_confidence),
            "--full-head" if args.full_head else "--no-full-head",
        ]
    )
    # One thread: the proposer shares these cores with the target (see `smartspec up --proposer-threads`).
    proc = (
        None
        if args.in_process
        else subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smartspec.cli",
                "proposer",
                *kind_args,
                "--port",
                str(args.port),
                "--threads",
                "1",
                "--device",
                args.device,
                "--dtype",
                args.dtype,
            ]
        )
    )

    try:  # the proposer process goes down with this one, whatever fails

        def load(model: str):
            return load_model(model, args.dtype, args.device)

        tok = load_tokenizer(args.target)
        on_cpu = torch.device(args.device).type == "cpu"
        stock_hf = args.stock_hf or not on_cpu
        target_for_engine = load(args.target)
        target_for_hf = load(args.target) if stock_hf else None
        draft_path = resolve(args.draft)
        draft_for_hf = None if args.ngram or not stock_hf else load(draft_path)
        # HF with the engine's CPU linear layers: like for like on the kernels, so it compares the speculation.
        fast_target = load(args.target) if on_cpu else None
        fast_draft = load(draft_path) if on_cpu and not args.ngram else None
        for m in (fast_target, fast_draft):
            if m is not None:
                use_cpu_linear(m)
        if args.in_process:
            drafting = DraftConfig(
                draft=None if args.ngram else args.draft,
                kv_cache_tokens=8192,
                min_confidence=args.min_confidence,
                full_head=args.full_head,
            )
            proposer = LocalProposer(drafting.make_backend(Placement(args.dtype, args.device)))
        else:
            wait_serving(args.port, proc, 120)
            proposer = ProposerClient([f"127.0.0.1:{args.port}"], deadline_s=5.0)
        engine = Engine(target_for_engine, tok, EngineConfig(CacheConfig(kv_cache_tokens=8192)), proposer)
        ids = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            for p in prompts
        ]
        run_engine(engine, ids[:1], 8, 2)  # warm-up
        hf_models = dict(zip(HF_KEYS, ((target_for_hf, draft_for_hf), (fast_target, fast_draft))))
        for target, draft in hf_models.values():
            hf_assisted(target, tok, draft, prompts[:1], 8, 2, args.ngram)
        rounds = [
            measure_round(engine, ids, prompts, new_tokens, ks, tok, hf_models, args.ngram, n)
            for n in range(1, args.rounds + 1)
        ]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": device_name(args.device),
        "machine": machine_info(),
        "dtype": args.dtype,
        "proposer": name,
        "new_tokens": new_tokens,
        "rounds": args.rounds,
    }
    print(write_summary(rounds, ks, out_dir, info))


if __name__ == "__main__":
    main()
