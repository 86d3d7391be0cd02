"""`benchmarks/simulate_peers.py` runs end to end on a small grid and writes what BENCHMARKS.md reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_simulate_peers_writes_ratios_for_every_peer(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "simulate_peers.py"), "--acceptances", "0.7", "--rates", "4",
           "--seeds", "2", "--num-requests", "12", "--output-dir", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    (ratio,) = results["smartspec_ratios"]
    assert {"best_static", "off", "vllm-dynamic", "sglang-adaptive", "trtllm", "hf-heuristic", "paper"} <= set(ratio)
    assert all(v > 0 for k, v in ratio.items() if k not in ("acceptance", "rate"))
    assert len(results["rows"]) == 9 + 2 + 6 and all(len(r["per_seed"]) == 2 for r in results["rows"])
    assert (tmp_path / "simulate_peers.png").exists()


def test_simulate_speed_reports_wall_and_simulated_time_per_size(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "simulate_speed.py"), "--requests", "10,20",
           "--output-dir", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["requests"], r["policy"]) for r in rows] == [
        (10, "off"),
        (10, "smartspec"),
        (20, "off"),
        (20, "smartspec"),
    ]
    assert all(r["simulated_s"] > 0 and r["wall_s"] > 0 and r["steps"] > 0 for r in rows)
