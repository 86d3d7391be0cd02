"""`benchmarks/simulate_fleet.py` runs end to end on a small grid and writes what BENCHMARKS.md reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_simulate_fleet_reports_goodput_per_gpu_demand_and_an_outage(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "simulate_fleet.py"), "--verifiers", "2", "--proposers", "1,2",
           "--rates", "8", "--seeds", "1", "--requests-per-verifier", "15", "--output-dir", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300)
    res = json.loads((tmp_path / "results.json").read_text())
    combos = {(p["policy"], p["proposers"]) for p in res["points"]}
    assert combos == {("off", 0), ("fixed:3", 1), ("fixed:3", 2), ("smartspec", 1), ("smartspec", 2)}
    assert all(p["goodput_per_gpu"] > 0 for p in res["points"])
    assert all(p["proposer_demand"] == 0 for p in res["points"] if p["policy"] == "off")
    assert set(res["implied_replicas"]) == {"8.0/fixed:3", "8.0/smartspec"}
    assert all(v["replicas"] >= 1 for v in res["implied_replicas"].values())
    assert [p["outage"] for p in res["outage"]] == [False, True]
    assert [p["pin"] for p in res["pinning"]] == ["request", "verifier"]
    assert (tmp_path / "table.md").exists() and (tmp_path / "fleet.png").exists()
