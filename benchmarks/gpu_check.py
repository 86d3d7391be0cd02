"""One prepared GPU check: step times eager vs CUDA graphs, gathered vs paged attention,
batch-1 TPOT, and the built-in pair's k.

    python benchmarks/gpu_check.py [--device cuda] [--output-dir benchmarks/results/gpu_check]
    python benchmarks/gpu_check.py --tiny --device cpu --modes off,compile   # the same code on a CPU

1. Ceilings: device copy bandwidth (read + write), so each model's weights-bandwidth
   floor (weight bytes / bandwidth) is measured on the card, not assumed.
2. `ModelRunner.forward` step time for B requests x q new tokens over a `--ctx`-token
   cached context, for Llama-2-7B and Llama-68M shapes built from their configs with
   random weights (no download), per variant `mode/attention`: runner mode `off` (eager)
   or `cuda` (CUDA graphs), attention `sdpa` (gathered blocks) or a paged kernel (`flash`:
   torch's, `triton`: this repository's; each at the smallest block size of 16 and 256 it
   takes here, and skipped, with the reason, where it cannot run). Median of `--reps` after two
   warm-up calls (the first captures the bucket's graph). Each variant's logits of one step are
   compared with eager sdpa's: graphs and the paged kernels must compute the same model. At the
   bars' shapes (B, q) = (1, 1), (1, 5), (32, 1), a profile of the ops with the most device time.
3. Batch-1 TPOT of SmolLM2-135M through `Engine.step()` greedy decoding (its shape with
   random weights, or the real model with `--target`), per variant, and `engine_start_s` (the
   engine's construction, its batch-1 graphs' warm-up included).
4. The built-in draft pair at batch 1, fixed k = 0..4 (`--ks`), with the in-process
   draft model (shipped in the repository). With `--target` (SmolLM2-135M, e.g. its .gguf
   file) its TPOT per k. Without, the target is SmolLM2's shape with random weights: it
   accepts nothing, so each step is one full round (k drafts, k + 1 verified) whatever
   its weights, and `pair_projected` divides that round time by the tokens per round the
   real pair reaches (the draft's acceptance.json, per workload).
5. Right after each of `--compiled-models`' variants, while the run is inside
   `--budget-s`: its `--compiled` variant (`cuda-compiled`: the forward compiled before each
   bucket's capture, `--compile`) at the bars' shapes only, with the serving variant's
   attention, compared with eager sdpa like the others. Each shape is a section with a
   runner of its own and so a compile of its own (tens of seconds for the 7B model).

Every section runs on its own: a failure is recorded under `errors` and the rest goes on;
results.json is rewritten after each. It holds `info`, `ceilings`, `models` ({name:
{shape, params, floor_ms, rows, variant, variants, agreement, paged, profiles}}: `rows`
are the serving variant's (graphs, with a paged kernel where one runs) in the cost-profile format
`{B, q, ctx, ms}`, so `load_profile("results.json#llama-7b")` seeds the cost model and the
simulator with them), `tpot`, `engine_start_s`, `pair`, `pair_projected`, `bars` (the targets this check
exists for, each with its measured value), `skipped` (what was left out, and why) and
`errors`. Budget: about 8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_steps import (  # noqa: E402
    BLOCK_SIZE,
    PROFILED,
    SHAPES,
    copy_bandwidth,
    decode,
    paged_blocks,
    probe_shape,
    random_model,
    serving_variant,
    step_times,
    variants,
)
from machine import device_name, machine_info  # noqa: E402

from drafting.builtin import BUILTIN_DRAFT, builtin_draft_dir  # noqa: E402
from runtime import model_thread  # noqa: E402
from runtime.models import load_tokenizer  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


class Sections:
    """Runs each section on its own, keeps its error, and rewrites results.json after each."""

    def __init__(self, results: dict, path: Path):
        self.results, self.path = results, path
        self.probes = {}  # per model, eager sdpa's logits of the probe step: what variants are compared with
        results["errors"] = []

    def run(self, name: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # one failed section must not cost the others' device time
            tail = traceback.format_exc().strip().splitlines()[-6:]
            self.results["errors"].append({"section": name, "error": repr(exc), "traceback": tail})
            print(f"FAILED {name}: {exc!r}", flush=True)
            return None
        finally:
            self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1))


def agreement(logits: dict, base) -> dict:
    """Each variant's logits of the probe step against eager gathered attention's."""
    if base is None:
        return {}
    return {v: ((x - base).abs().max() / base.abs().max()).item() for v, x in logits.items() if v != "off/sdpa"}


def measure_model(name: str, args, modes, attentions, dtype, bandwidth: float, sections: Sections) -> dict:
    model = random_model(name, dtype, args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Every weight is read once a step; `bandwidth` counts a copy's reads and writes, which
    # share the memory bus, so it is the rate of reading alone too.
    floor_ms = weight_bytes / bandwidth * 1e3
    print(f"{name}: {weight_bytes / 1e9:.2f} GB of weights, floor {floor_ms:.2f} ms", flush=True)
    blocks, refused = paged_blocks(attentions, model.config, dtype, args.device)
    print(f"  paged kernels: block sizes {blocks}, refused {refused}", flush=True)
    rows, logits, profiles = {}, {}, {}
    for variant, bs in variants(modes, attentions, blocks).items():
        got = sections.run(f"{name} {variant}", step_times, model, args, variant, bs)
        if got is not None:
            rows[variant], logits[variant], profiles[variant] = got["rows"], got["logits"], got["profiles"]
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()  # the runner's cache and graphs went with it
    sections.probes[name] = logits.get("off/sdpa")
    serving = serving_variant(rows)
    return {
        "shape": SHAPES[name],
        "params": sum(p.numel() for p in model.parameters()),
        "floor_ms": floor_ms,
        "rows": rows[serving],
        "variant": serving,
        "variants": rows,
        "agreement": agreement(logits, sections.probes[name]),
        "paged": {"block_sizes": blocks, "refused": refused},
        "profiles": profiles,  # per variant and shape: the ops with the most device time, per step
    }


def measure_compiled(name: str, args, dtype, sections: Sections, deadline: float) -> None:
    """The compiled variant at the bars' shapes, with the model's serving attention, added to
    its entry (`variants`, `agreement`, `profiles`); each shape (a compile) is a section of
    its own, and none starts past `deadline` (perf_counter)."""
    entry = sections.results["models"][name]
    attention = entry["variant"].split("/")[1]
    variant = f"{args.compiled}/{attention}"
    block_size = entry["paged"]["block_sizes"].get(attention) or BLOCK_SIZE
    model = random_model(name, dtype, args.device)  # the same seed: the same weights as before
    entry["variants"][variant], entry["profiles"][variant] = [], {}
    shapes = [(b, q) for b, q in sorted(PROFILED) if b in args.batch and q in args.q]
    if probe_shape(args) not in shapes:
        sections.results["skipped"].append(f"{name} {variant} agreement: its shapes miss the probe {probe_shape(args)}")
    for shape in shapes:
        if time.perf_counter() > deadline:
            sections.results["skipped"].append(f"{name} {variant} B={shape[0]} q={shape[1]}: past --budget-s")
            continue
        got = sections.run(f"{name} {variant} {shape}", step_times, model, args, variant, block_size, [shape])
        if got is not None:
            entry["variants"][variant] += got["rows"]
            entry["profiles"][variant].update(got["profiles"])
            if got["logits"] is not None:
                entry["agreement"].update(agreement({variant: got["logits"]}, sections.probes.get(name)))


def measure_pair(target, tok, args, variant: str, block_size: int, sections: Sections) -> dict:
    from drafting.config import DraftConfig
    from drafting.local import LocalProposer
    from runtime.models import Placement

    mode, attention = variant.split("/")
    placement = Placement(args.dtype, args.device, cuda_graphs="on" if mode == "cuda" else "off", attention=attention)

    def point(k: int) -> dict:  # the draft's loading too, so its failure stays in the section
        backend = DraftConfig(BUILTIN_DRAFT, 8192, max_batch=1).make_backend(placement) if k else None
        proposer = LocalProposer(backend) if k else None
        return decode(target, tok, variant, block_size, args.new_tokens, PROMPT, proposer, k)

    pair = {}
    for k in (int(x) for x in args.ks.split(",")):
        got = sections.run(f"pair k={k}", point, k)
        if got is not None:
            pair[str(k)] = got
            print(f"  pair k={k}: {got['tpot_ms']:.2f} ms a token, {got['round_ms']:.2f} ms a round", flush=True)
    return pair


def projected(pair: dict) -> dict:
    """{workload: {k: ms per token}}: each k's round time over the tokens per round the real
    pair reaches (the draft's acceptance.json)."""
    acceptance = json.loads((Path(builtin_draft_dir()) / "acceptance.json").read_text())
    out = {}
    for workload in ("code", "chat"):
        per_k = acceptance[workload]["k"]
        out[workload] = {
            k: r["round_ms"] / (per_k[k]["tokens_per_step"] if k != "0" else 1.0)
            for k, r in pair.items()
            if k == "0" or k in per_k
        }
    return out


def bars(results: dict) -> dict:
    """The targets the GPU step is held to, each with what was measured (None: not measured)."""
    models, tpot = results["models"], results["tpot"]

    def ms(rows, b, q):
        return next((r["ms"] for r in rows if r["B"] == b and r["q"] == q), None)

    out = {}
    if "llama-7b" in models:
        entry = models["llama-7b"]
        compiled = {v: rows for v, rows in entry["variants"].items() if v.startswith("cuda-compiled/")}
        for suffix, rows in [("", entry["rows"])] + [(f" ({v})", r) for v, r in compiled.items()]:
            d1, d5, d32 = ms(rows, 1, 1), ms(rows, 1, 5), ms(rows, 32, 1)
            out["7b_decode_b1_ms" + suffix] = {"value": d1, "target": "<= 6.6 on an H200, <= 8 on an H100"}
            floor = entry["floor_ms"]
            out["7b_decode_b1_over_floor" + suffix] = {"value": d1 / floor if d1 else None, "target": "<= 2"}
            out["7b_verify5_over_decode_b1" + suffix] = {"value": d5 / d1 if d1 and d5 else None, "target": "<= 1.15"}
            out["7b_decode_b32_ms" + suffix] = {"value": d32, "target": "<= 10 on an H200"}
        for variant, err in entry["agreement"].items():
            out[f"7b_logits_{variant}_vs_eager_sdpa"] = {"value": err, "target": "<= 0.02 (bf16 rounding)"}
    if tpot:
        out["smollm2_tpot_ms"] = {"value": tpot[serving_variant(tpot)], "target": "<= 5"}
    sources = {}  # without a real target the measured pair accepts nothing: only its projection counts
    if results["pair"] and "pair_projected" not in results:
        sources["measured"] = {k: r["tpot_ms"] for k, r in results["pair"].items()}
    for workload, per_k in (results.get("pair_projected") or {}).items():
        sources[f"projected, {workload}"] = per_k
    for source, per_k in sources.items():
        best = min((v for k, v in per_k.items() if k != "0"), default=None)
        if best and "0" in per_k:
            out[f"pair_best_k_over_off ({source})"] = {"value": best / per_k["0"], "target": "< 1"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--models", default="llama-7b,llama-68m")
    ap.add_argument("--modes", default="off,cuda", help="runner modes to compare: off | compile | cuda")
    ap.add_argument("--attention", default="sdpa,flash,triton", help="attentions to compare: sdpa | flash | triton")
    ap.add_argument("--batch", default="1,8,32,64")
    ap.add_argument("--q", default="1,2,5,9")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--target", default="", help="SmolLM2-135M (.gguf or directory): real TPOT and pair")
    ap.add_argument("--ks", default="0,1,2,3,4")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU run of the same code")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the op profiles")
    ap.add_argument("--compiled", default="cuda-compiled", help="compiled mode measured after its model ('': none)")
    ap.add_argument("--compiled-models", default="llama-7b", help="models measured compiled (at the bars' shapes)")
    ap.add_argument("--budget-s", type=float, default=360, help="no compiled shape starts past this many seconds")
    ap.add_argument("--output-dir", default="benchmarks/results/gpu_check")
    args = ap.parse_args()
    args.batch = [int(x) for x in args.batch.split(",")]
    args.q = [int(x) for x in args.q.split(",")]
    modes, attentions = args.modes.split(","), args.attention.split(",")
    names = ["tiny-a", "tiny-b"] if args.tiny else args.models.split(",")
    dtype = getattr(torch, args.dtype)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    bandwidth = model_thread.call(copy_bandwidth, args.device, 64 if args.tiny else args.copy_mib)
    print(f"{device_name(args.device)}: copy {bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)
    results = {
        "info": {**machine_info(), "device": device_name(args.device), "dtype": args.dtype},
        "ceilings": {"copy_tb_s": bandwidth / 1e12},
        "models": {},
        "tpot": {},
        "engine_start_s": {},
        "pair": {},
        "skipped": [],  # what was left out, and why
    }
    sections = Sections(results, out / "results.json")
    compiled = [n for n in args.compiled_models.split(",") if args.compiled]
    for name in names:
        got = sections.run(name, measure_model, name, args, modes, attentions, dtype, bandwidth, sections)
        if got is not None:
            results["models"][name] = got
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
        if name in compiled and got is not None:  # the variant most likely to meet the B = 1 bar: early
            deadline = started + args.budget_s
            sections.run(f"{name} {args.compiled}", measure_compiled, name, args, dtype, sections, deadline)
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
    tok = load_tokenizer(builtin_draft_dir())  # SmolLM2's tokenizer, shipped with the draft
    if args.target:
        from runtime.models import load_model

        target = load_model(args.target, args.dtype, args.device)
    else:
        target = random_model("tiny-a" if args.tiny else "smollm2-135m", dtype, args.device)
    runs = variants(modes, attentions, paged_blocks(attentions, target.config, target.dtype, args.device)[0])
    for v, bs in runs.items():
        got = sections.run(f"tpot {v}", decode, target, tok, v, bs, args.new_tokens, PROMPT)
        if got is not None:
            results["tpot"][v] = got["tpot_ms"]
            results["engine_start_s"][v] = got["start_s"]
    print(f"TPOT batch 1 ({'target' if args.target else 'random weights'}): {results['tpot']}", flush=True)
    serving = serving_variant(runs)
    if not args.target and args.tiny:  # the pair needs the draft's vocabulary: SmolLM2's shape
        target = random_model("smollm2-135m", dtype, args.device)
    results["pair"] = measure_pair(target, tok, args, serving, runs[serving], sections)
    if not args.target:
        results["pair_projected"] = sections.run("pair projection", projected, results["pair"])
    results["bars"] = bars(results)
    results["elapsed_s"] = time.perf_counter() - started
    sections.save()
    print(json.dumps(results["bars"], indent=1))
    print(f"wrote {out / 'results.json'} in {results['elapsed_s']:.0f} s; {len(results['errors'])} errors")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
