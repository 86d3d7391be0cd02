"""One prepared GPU check: step times eager vs CUDA graphs, batch-1 TPOT, and the built-in pair's k.

    python benchmarks/gpu_check.py [--device cuda] [--output-dir benchmarks/results/gpu_check]
    python benchmarks/gpu_check.py --tiny --device cpu --modes off,compile   # the same code on a CPU

1. Ceilings: device copy bandwidth (read + write), so each model's weights-bandwidth
   floor (weight bytes / bandwidth) is measured on the card, not assumed.
2. `ModelRunner.forward` step time for B requests x q new tokens over a `--ctx`-token
   cached context, for Llama-2-7B and Llama-68M shapes built from their configs with
   random weights (no download), per variant `mode/attention`: runner mode `off` (eager)
   or `cuda` (CUDA graphs), attention `sdpa` (gathered blocks) or `flash` (the paged
   kernel, at the smallest block size of 16 and 256 it takes here; skipped, with the
   reason, where it cannot run). Median of `--reps` after two warm-up calls (the first
   captures the bucket's graph). Each variant's logits of one step are compared with
   eager sdpa's: graphs and the flash kernel must compute the same model.
3. Batch-1 TPOT of SmolLM2-135M through `Engine.step()` greedy decoding (its shape with
   random weights, or the real model with `--target`), per variant.
4. With `--target` (SmolLM2-135M, e.g. its .gguf file) the built-in draft pair at batch 1,
   fixed k = 0..4 (`--ks`), TPOT per k with the in-process draft model.

Writes results.json: `info`, `ceilings`, `models` ({name: {shape, params, floor_ms, rows,
variant, variants, agreement, flash}}: `rows` are the serving variant's (graphs, with
flash where it runs) in the cost-profile format `{B, q, ctx, ms}`, so
`load_profile("results.json#llama-7b")` seeds the cost model and the simulator with them),
`tpot`, `pair` and `bars` (the targets this check exists for, each with its measured
value). Budget: about 8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import device_name, machine_info  # noqa: E402

from controller.policy import Policy  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from runtime import model_thread, paged_flash  # noqa: E402
from runtime.attention import ForwardItem  # noqa: E402
from runtime.model_runner import ModelRunner, kv_shape  # noqa: E402
from runtime.models import load_tokenizer  # noqa: E402
from runtime.sampler import SamplingParams  # noqa: E402

FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
SHAPES = {
    name: dict(zip(FIELDS, sizes), vocab_size=vocab, **extra)
    for name, sizes, vocab, extra in [
        ("llama-7b", (4096, 11008, 32, 32, 32), 32000, {}),
        ("llama-68m", (768, 3072, 2, 12, 12), 32000, {}),
        ("smollm2-135m", (576, 1536, 30, 9, 3), 49152, {"tie_word_embeddings": True}),
        # --tiny: the same code on a CPU in seconds
        ("tiny-a", (64, 128, 2, 4, 2), 512, {}),
        ("tiny-b", (32, 64, 1, 2, 2), 256, {}),
    ]
}
BLOCK_SIZE = 16
STEPS = asyncio.Runner()


def random_model(name: str, dtype: torch.dtype, device: str):
    return model_thread.call(_random_model, name, dtype, device)  # all torch work on one thread


def _random_model(name: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[name])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 7B model in float32 first would double the memory
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, mib: int) -> float:
    """Device-to-device copy, bytes read + written per second (median of 5)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / statistics.median(times[1:])


def flash_block(config, dtype, device: str) -> tuple[int | None, dict]:
    """The smallest block size of 16 and 256 the paged flash kernel takes here (None: neither),
    and why each smaller one was refused."""
    refused = {}
    _, kv_heads, head_dim = kv_shape(config)
    for bs in (BLOCK_SIZE, 256):
        why = model_thread.call(
            paged_flash.unavailable, config.num_attention_heads, kv_heads, head_dim, bs, dtype, device
        )
        if why is None:
            return bs, refused
        refused[str(bs)] = why
    return None, refused


def step_times(model, args, variant: str, block_size: int) -> tuple[list[dict], torch.Tensor]:
    """{B, q, ctx, ms} per shape (every request's context prefilled once, then each (B, q) step
    timed), and the logits of the smallest batch's largest verification step."""
    mode, attention = variant.split("/")
    b_max, q_max = max(args.batch), max(args.q)
    per_request = -(-(args.ctx + q_max) // block_size) + 1  # + 1: a padded grid reads up to 16 more
    runner = ModelRunner(model, b_max * per_request, block_size, graphs=mode, attention=attention)
    tables = [list(range(i * per_request, (i + 1) * per_request)) for i in range(b_max)]
    with torch.inference_mode():
        for start in range(0, b_max, 8):  # prefill, eagerly, 8 contexts at a time
            runner._eager([ForwardItem([1] * args.ctx, 0, t, 0) for t in tables[start : start + 8]])
    rows, probe = [], None
    for b in args.batch:
        for q in args.q:
            items = [ForwardItem([7 + i % 5] * q, args.ctx, tables[i], q) for i in range(b)]
            times = []
            for _ in range(args.reps + 2):
                start = time.perf_counter()
                logits = runner.forward(items)  # synchronises a CUDA device before it returns
                times.append((time.perf_counter() - start) * 1e3)
            if probe is None and b == min(args.batch) and q == q_max:
                probe = logits.cpu()
            rows.append({"B": b, "q": q, "ctx": args.ctx, "ms": statistics.median(times[2:])})
            print(f"  {variant:10s} B={b:3d} q={q}: {rows[-1]['ms']:8.2f} ms", flush=True)
    return rows, probe


def decode_tpot(model, tok, variant: str, block_size: int, new_tokens: int, prompt: str, proposer=None, k=0) -> float:
    """Batch-1 greedy time per output token through the engine (first token excluded), ms."""
    mode, attention = variant.split("/")
    cache = CacheConfig(block_size=block_size, kv_cache_tokens=4096)
    cfg = EngineConfig(cache, policy=Policy.fixed(k), graphs=mode, attention=attention)
    engine = Engine(model, tok, cfg, proposer)
    engine.add_request("r", tok(prompt).input_ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    first, made = None, 0
    while engine.has_work():
        outs = STEPS.run(engine.step())
        made += sum(len(o.token_ids) for o in outs)
        if first is None and made:
            first, first_made = time.perf_counter(), made
    return (time.perf_counter() - first) * 1e3 / max(made - first_made, 1)


def variants(modes: list[str], attentions: list[str], flash_bs: int | None) -> dict[str, int]:
    """{"mode/attention": block size} of the variants that can run here."""
    return {
        f"{mode}/{att}": flash_bs if att == "flash" else BLOCK_SIZE
        for mode in modes
        for att in attentions
        if att != "flash" or flash_bs is not None
    }


def serving_variant(names) -> str:
    """What a server here would run: graphs, with the flash kernel where it runs."""
    return next((v for v in ("cuda/flash", "cuda/sdpa", "compile/sdpa") if v in names), list(names)[0])


def bars(models: dict, tpot: dict, pair: dict) -> dict:
    """The targets the GPU step is held to, each with what was measured (None: not measured)."""

    def ms(name, b, q):
        rows = models.get(name, {}).get("rows", [])
        return next((r["ms"] for r in rows if r["B"] == b and r["q"] == q), None)

    out = {}
    if "llama-7b" in models:
        d1, d5, d32 = ms("llama-7b", 1, 1), ms("llama-7b", 1, 5), ms("llama-7b", 32, 1)
        floor = models["llama-7b"]["floor_ms"]
        out["7b_decode_b1_over_floor"] = {"value": d1 / floor if d1 else None, "target": "<= 2"}
        out["7b_verify5_over_decode_b1"] = {"value": d5 / d1 if d1 and d5 else None, "target": "<= 1.15"}
        out["7b_decode_b32_ms"] = {"value": d32, "target": "<= 10 on an H200"}
        for variant, err in models["llama-7b"]["agreement"].items():
            out[f"7b_logits_{variant}_vs_eager_sdpa"] = {"value": err, "target": "<= 0.02 (bf16 rounding)"}
    if tpot:
        out["smollm2_tpot_ms"] = {"value": tpot[serving_variant(tpot)], "target": "<= 5"}
    if pair:
        best = min((v for k, v in pair.items() if k != "0"), default=None)
        out["pair_best_k_over_off"] = {"value": best / pair["0"] if best else None, "target": "< 1"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--models", default="llama-7b,llama-68m")
    ap.add_argument("--modes", default="off,cuda", help="runner modes to compare: off | compile | cuda")
    ap.add_argument("--attention", default="sdpa,flash", help="attentions to compare: sdpa | flash")
    ap.add_argument("--batch", default="1,8,32,64")
    ap.add_argument("--q", default="1,2,5,9")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--target", default="", help="SmolLM2-135M (.gguf or directory) for TPOT and the draft pair")
    ap.add_argument("--ks", default="0,1,2,3,4")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU run of the same code")
    ap.add_argument("--copy-mib", type=int, default=1024)
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
    }
    for name in names:
        model = random_model(name, dtype, args.device)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # Every weight is read once a step; a copy moves each byte twice (read + write).
        floor_ms = weight_bytes / (bandwidth / 2) * 1e3
        print(f"{name}: {weight_bytes / 1e9:.2f} GB of weights, floor {floor_ms:.2f} ms", flush=True)
        flash_bs, refused = flash_block(model.config, dtype, args.device)
        print(f"  flash: block size {flash_bs}, refused {refused}", flush=True)
        rows, logits = {}, {}
        for variant, bs in variants(modes, attentions, flash_bs).items():
            rows[variant], logits[variant] = step_times(model, args, variant, bs)
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()  # the runner's cache and graphs went with it
        base = logits[next(iter(logits))]
        serving = serving_variant(rows)
        results["models"][name] = {
            "shape": SHAPES[name],
            "params": sum(p.numel() for p in model.parameters()),
            "floor_ms": floor_ms,
            "rows": rows[serving],
            "variant": serving,
            "variants": rows,
            # each variant's logits of one step against the first (eager, gathered) variant's
            "agreement": {v: ((x - base).abs().max() / base.abs().max()).item() for v, x in list(logits.items())[1:]},
            "flash": {"block_size": flash_bs, "refused": refused},
        }
        del model
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    tok = load_tokenizer("smollm2")
    prompt = "Write a short story about a robot who learns to paint."
    if args.target:
        from runtime.models import load_model

        target = load_model(args.target, args.dtype, args.device)
    else:
        target = random_model("tiny-a" if args.tiny else "smollm2-135m", dtype, args.device)
    flash_bs, _ = flash_block(target.config, target.dtype, args.device)
    runs = variants(modes, attentions, flash_bs)
    results["tpot"] = {v: decode_tpot(target, tok, v, bs, args.new_tokens, prompt) for v, bs in runs.items()}
    print(f"TPOT batch 1 ({'target' if args.target else 'random weights'}): {results['tpot']}", flush=True)
    results["pair"] = {}
    if args.target:
        from drafting.builtin import BUILTIN_DRAFT
        from drafting.config import DraftConfig
        from drafting.local import LocalProposer
        from runtime.models import Placement

        serving = serving_variant(runs)
        mode, attention = serving.split("/")
        placement = Placement(args.dtype, args.device, cuda_graphs="on" if mode == "cuda" else "off")
        for k in (int(x) for x in args.ks.split(",")):
            backend = DraftConfig(draft=BUILTIN_DRAFT, kv_cache_tokens=8192).make_backend(placement) if k else None
            proposer = LocalProposer(backend) if k else None
            results["pair"][str(k)] = decode_tpot(
                target, tok, serving, runs[serving], args.new_tokens, prompt, proposer, k
            )
            print(f"  pair k={k}: {results['pair'][str(k)]:.2f} ms a token", flush=True)
    results["bars"] = bars(results["models"], results["tpot"], results["pair"])
    results["elapsed_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["bars"], indent=1))
    print(f"wrote {out / 'results.json'} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
