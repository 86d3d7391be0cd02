"""Host time to pack one step (`PackedStep.build`) as batch and context grow.

    python benchmarks/pack_step.py [--reps 50] [--output-dir benchmarks/results/pack_step]

Each decode step's requests (one new token, a `ctx`-token context) are packed into the one
integer tensor the device receives, their block tables padded to the graph bucket's width
(gathered attention's: the next power of two of the blocks a request needs). For
comparison, `lists` packs the same step as Python lists padded element by element and
converted with `torch.tensor`; both must give the same tensor. `fixed` packs it at a paged
kernel's one width for requests up to `--max-len` tokens (`runtime.graphs`), what a GPU
server packs at any context. Medians of `--reps`, per (B, ctx), the methods interleaved so
drift hits them alike. Writes results.json and pack_step.png.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info, median_ms  # noqa: E402

from runtime.attention import ForwardItem, PackedStep  # noqa: E402
from runtime.graphs import TABLE_LIMIT  # noqa: E402

BLOCK = 16


def by_lists(items: list[ForwardItem], pad: int, widths: list[int], blocks: int) -> torch.Tensor:
    """The same packed tensor from Python lists: every padding slot is a list element."""
    qs = [len(it.token_ids) for it in items]
    need = [-(-(it.ctx + q) // BLOCK) for it, q in zip(items, qs)]
    tables = [it.block_table[:n] + [pad] * (blocks - n) for it, n in zip(items, need)]
    ids = [it.token_ids + [0] * (w - q) for it, q, w in zip(items, qs, widths)]
    head = [it.ctx for it in items] + qs + widths + [it.num_logits for it in items]
    return torch.tensor(head + list(itertools.chain(*tables)) + list(itertools.chain(*ids)), dtype=torch.long)


def plot(rows: list[dict], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = [f"B={r['B']}\nctx={r['ctx']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.27 for i in x], [r["lists_ms"] for r in rows], 0.27, label="Python lists + torch.tensor")
    ax.bar(list(x), [r["packed_ms"] for r in rows], 0.27, label="PackedStep.build, power-of-two width")
    fixed = [r["fixed_ms"] for r in rows]
    ax.bar([i + 0.27 for i in x], fixed, 0.27, label=f"PackedStep.build, {rows[0]['fixed_blocks']} blocks (paged)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("Packing a decode step on the host")
    ax.legend()
    fig.savefig(out / "pack_step.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,16,64,256")
    ap.add_argument("--contexts", default="500,4000")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=4096, help="the longest request, which sizes the fixed width")
    ap.add_argument("--output-dir", default="benchmarks/results/pack_step")
    args = ap.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    fixed = min(-(-(args.max_len + 16) // BLOCK), TABLE_LIMIT)  # GraphRunner's width for a paged kernel
    for b, ctx in itertools.product(map(int, args.batch_sizes.split(",")), map(int, args.contexts.split(","))):
        own = -(-(ctx + 1) // BLOCK)
        items = [ForwardItem([5 + i % 7], ctx, list(range(i * own, (i + 1) * own)), 1) for i in range(b)]
        pad = b * own
        blocks = 1 << (own - 1).bit_length()
        packed = PackedStep.build(items, BLOCK, pad, 16, [1] * b, blocks).host
        assert torch.equal(packed, by_lists(items, pad, [1] * b, blocks)), "the two packings differ"
        lists = functools.partial(by_lists, items, pad, [1] * b, blocks)
        built = functools.partial(PackedStep.build, items, BLOCK, pad, 16, [1] * b, blocks)
        wide = functools.partial(PackedStep.build, items, BLOCK, pad, 16, [1] * b, max(fixed, own))
        times = [[median_ms(f, args.reps) for f in (lists, built, wide)] for _ in range(3)]  # interleaved
        row = {"B": b, "ctx": ctx, "blocks": blocks, "fixed_blocks": max(fixed, own)}
        for i, name in enumerate(("lists_ms", "packed_ms", "fixed_ms")):
            row[name] = statistics.median(t[i] for t in times)
        rows.append(row)
        print(
            f"B={b:4d} ctx={ctx:5d} ({blocks:3d} blocks): lists {row['lists_ms']:7.3f} ms, "
            f"PackedStep.build {row['packed_ms']:7.3f} ms, at {row['fixed_blocks']} blocks {row['fixed_ms']:7.3f} ms",
            flush=True,
        )
    meta = {"machine": machine_info(), "max_len": args.max_len}
    (out / "results.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))
    plot(rows, out)
    print(f"wrote {out / 'results.json'}, {out / 'pack_step.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
