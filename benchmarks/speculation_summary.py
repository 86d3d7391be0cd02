"""The batch-1 speculation benchmark's summary: medians over rounds, the analytic optimum, the table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HF_KEYS = ("hf_tpot_ms", "hf_cpu_linear_tpot_ms")  # HF assisted: stock linear layers, the engine's CPU ones


def fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}"


def analytic(a: float, k: int, c: float, r: float) -> float:
    expected = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return expected / (1 + k * c + r)


def median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise_rounds(rounds: list[dict], ks: list[int]) -> tuple[dict, list[dict], dict]:
    """Per configuration: the median over rounds of TPOT, and of the speedup paired with the same round's off."""
    off_ms = [r["off"]["tpot_ms"] for r in rounds]
    off = {"k": 0, "tpot_ms": statistics.median(off_ms), "tpot_ms_rounds": off_ms}

    def merged(runs: list[dict]) -> dict:
        return {
            "tpot_ms": statistics.median(x["tpot_ms"] for x in runs),
            "tpot_ms_rounds": [x["tpot_ms"] for x in runs],
            "speedup": statistics.median(o / x["tpot_ms"] for o, x in zip(off_ms, runs)),
            "acceptance": median_or_none(x["acceptance"] for x in runs),
        }

    rows = []
    for i, k in enumerate(ks):
        runs = [r["rows"][i] for r in rounds]
        row = {"k": k, **merged(runs)}
        row["c"] = median_or_none(x["draft_step_ms"] / o for o, x in zip(off_ms, runs) if x["draft_step_ms"])
        row["r"] = median_or_none(x["hop_ms"] / o for o, x in zip(off_ms, runs) if x["hop_ms"] is not None)
        for key in HF_KEYS:
            row[key] = median_or_none(x[key] for x in runs)
            row[key + "_rounds"] = [x[key] for x in runs]
        rows.append(row)
    smart = {"k": None, **merged([r["smartspec"] for r in rounds])}
    return off, rows, smart


def write_summary(rounds: list[dict], ks: list[int], out_dir: Path, info: dict) -> str:
    """Writes results.json (`info` first) into out_dir; returns the table and the summary line."""
    off, rows, smart = summarise_rounds(rounds, ks)
    measured = [r for r in rows if r["acceptance"] is not None]
    a = statistics.median(r["acceptance"] for r in measured) if measured else 0.0
    c = median_or_none(r["c"] for r in rows) or 0.0
    r_hop = median_or_none(r["r"] for r in rows) or 0.0
    optimum = max(analytic(a, k, c, r_hop) for k in ks)
    best = max(rows, key=lambda r: r["speedup"])
    summary = {
        "acceptance": a,
        "c": c,
        "r": r_hop,
        "analytic_optimum": optimum,
        "best_k": best["k"],
        "best_speedup": best["speedup"],
        "fraction_of_optimum": best["speedup"] / optimum,
        "best_tpot_ms": best["tpot_ms"],
        **{f"best_{key}": min((r[key] for r in rows if r[key] is not None), default=None) for key in HF_KEYS},
        "smartspec_tpot_ms": smart["tpot_ms"],
        "smartspec_speedup": smart["speedup"],
        "smartspec_fraction_of_optimum": smart["speedup"] / optimum,
        "smartspec_fraction_of_best_fixed": smart["speedup"] / max(best["speedup"], 1.0),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                **info,
                "off": off,
                "rows": rows,
                "smartspec": smart,
                "summary": summary,
            },
            indent=1,
        )
    )
    lines = [
        "\n| k | TPOT (ms) | speedup vs off | acceptance | analytic speedup | HF assisted TPOT (ms) "
        "| HF assisted, CPU linear (ms) |",
        "|---|---|---|---|---|---|---|",
        f"| off | {off['tpot_ms']:.1f} | 1.00 | - | 1.00 | - | - |",
    ]
    for row in rows:
        lines.append(
            f"| {row['k']} | {row['tpot_ms']:.1f} | {row['speedup']:.2f} | "
            f"{row['acceptance'] if row['acceptance'] is None else round(row['acceptance'], 3)} | "
            f"{analytic(a, row['k'], c, r_hop):.2f} | {fmt(row['hf_tpot_ms'])} | {fmt(row['hf_cpu_linear_tpot_ms'])} |"
        )
    lines.append(
        f"\na = {a:.3f}, c = {c:.3f}, r = {r_hop:.4f}; analytic optimum {optimum:.2f}x; best fixed k = "
        f"{best['k']} at {best['speedup']:.2f}x = {summary['fraction_of_optimum']:.0%} of it; "
        f"best HF assisted TPOT {fmt(summary['best_hf_tpot_ms'])} ms "
        f"({fmt(summary['best_hf_cpu_linear_tpot_ms'])} ms with CPU linear) vs ours {best['tpot_ms']:.1f} ms; "
        f"smartspec {smart['tpot_ms']:.1f} ms = {smart['speedup']:.2f}x, "
        f"{summary['smartspec_fraction_of_optimum']:.0%} of the analytic optimum, "
        f"{summary['smartspec_fraction_of_best_fixed']:.0%} of max(best fixed k, off)"
    )
    return "\n".join(lines)
