"""Host overhead of one engine step: everything `Engine.step()` does besides the model's forward.

    python benchmarks/host_overhead.py [--device cpu] [--batch-sizes 1,16,64] [--steps 40] [--reps 5]
                                       [--prompt-len 16]

The model is a compute-negligible random Llama (2 layers, hidden 64, vocabulary
1,024, SmolLM2's tokenizer), so a step's time is nearly all host work:
scheduling, building the attention layout, sampling, emitting text. Each
request (a `--prompt-len`-token prompt; a long one makes block tables long) decodes
with greedy sampling and never stops early; after prefill,
`--steps` decode steps are timed per repetition. For each B the step is split
into:

- `model_ms`: the model's own forward (`model(...)`, from its first op to its logits);
- `layout_ms`: `ModelRunner.forward` besides the model: inputs, slot map, masks;
- `sample_ms`: token selection on the forward's logits;
- `other_ms`: the rest of the step: scheduling, the worker-thread hop, postprocessing and
  detokenization.

`host_ms` = step - model is the number the engine must keep small. Medians over
repetitions. Writes results.json and host_overhead.png into the output directory.
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

from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.scheduler import SchedulerConfig  # noqa: E402
from runtime import model_thread  # noqa: E402
from runtime.models import load_tokenizer  # noqa: E402
from runtime.sampler import SamplingParams  # noqa: E402


def tiny_model(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval().to(device)


class Timed:
    """Wraps a callable and sums the time spent in it (synchronising a CUDA device first)."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device, self.total_ms = fn, device, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.total_ms += (time.perf_counter() - start) * 1e3
        return out


async def timed_steps(engine: Engine, batch: int, steps: int) -> float:
    """ms per step, awaited back to back on one running event loop as the serving loop does
    (a fresh `runner.run` per step would add the loop's own start and stop to every step)."""
    start = time.perf_counter()
    for _ in range(steps):
        outs = await engine.step()
        assert len(outs) == batch
    return (time.perf_counter() - start) * 1e3 / steps


def measure(engine: Engine, runner: asyncio.Runner, batch: int, steps: int, prompt_len: int) -> dict:
    """Adds `batch` requests, runs their prefill, then times `steps` decode steps."""
    # No length limit within the run (all are aborted after it): with long prompts, requests whose
    # prefill ends first decode while the others' chunks run, and must still be there when timed.
    params = SamplingParams(max_new_tokens=100_000, ignore_eos=True)
    for i in range(batch):
        engine.add_request(
            f"{batch}-{i}-{time.monotonic_ns()}", [(7 * i + j) % 1000 + 1 for j in range(prompt_len)], params
        )
    while any(s.num_computed < prompt_len for s in engine._seqs.values()):  # prefill, untimed
        runner.run(engine.step())
    model, layout_and_model, sample = engine.runner.model, engine.runner.forward, engine.executor.sample
    timers = {
        "model": Timed(model.forward, engine.runner.device),
        "forward": Timed(layout_and_model, engine.runner.device),
    }
    timers["sample"] = Timed(sample, engine.runner.device)
    model.forward, engine.runner.forward, engine.executor.sample = timers["model"], timers["forward"], timers["sample"]
    try:
        step_ms = runner.run(timed_steps(engine, batch, steps))
    finally:
        del model.forward, engine.runner.forward, engine.executor.sample
    for rid in list(engine._seqs):
        engine.abort(rid)
    model_ms = timers["model"].total_ms / steps
    layout_ms = timers["forward"].total_ms / steps - model_ms
    sample_ms = timers["sample"].total_ms / steps
    return {
        "step_ms": step_ms,
        "model_ms": model_ms,
        "host_ms": step_ms - model_ms,
        "layout_ms": layout_ms,
        "sample_ms": sample_ms,
        "other_ms": step_ms - model_ms - layout_ms - sample_ms,
    }


def plot(rows: list[dict], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = [f"B={r['batch']}" for r in rows]
    bottom = [0.0] * len(rows)
    for part in ("model_ms", "layout_ms", "sample_ms", "other_ms"):
        vals = [max(r[part], 0.0) for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=part.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per engine step (median)")
    ax.set_title("Engine step with a compute-negligible model")
    ax.legend()
    fig.savefig(out / "host_overhead.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-dir", default="benchmarks/results/host_overhead")
    args = ap.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    tok = load_tokenizer("smollm2")
    cache = CacheConfig(kv_cache_tokens=max(batches) * (args.prompt_len + 240))
    config = EngineConfig(cache, SchedulerConfig(max_num_seqs=max(batches)))
    engine = Engine(model_thread.call(tiny_model, args.device), tok, config)  # torch work on one thread
    runner = asyncio.Runner()
    measure(engine, runner, max(batches), 5, args.prompt_len)  # warm-up: first calls allocate and load lazily
    reps = {b: [] for b in batches}
    for _ in range(args.reps):  # every B in each repetition, so drift hits all alike
        for b in batches:
            reps[b].append(measure(engine, runner, b, args.steps, args.prompt_len))
    rows = []
    for b in batches:
        row = {"batch": b, **{key: statistics.median(r[key] for r in reps[b]) for key in reps[b][0]}}
        rows.append(row)
        print(
            f"B={b:3d}: step {row['step_ms']:6.2f} ms = model {row['model_ms']:5.2f} + host {row['host_ms']:5.2f}"
            f" (layout {row['layout_ms']:4.2f}, sample {row['sample_ms']:4.2f}, other {row['other_ms']:4.2f})",
            flush=True,
        )
    results = {
        "machine": {**machine_info(), "device": device_name(args.device)},
        "steps": args.steps,
        "prompt_len": args.prompt_len,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, out)
    print(f"wrote {out / 'results.json'}, {out / 'host_overhead.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
