"""`benchmarks/simulate_validate.py` simulates a recorded live sweep and writes the comparison
BENCHMARKS.md reads. The live half needs the whole local stack for many minutes, so this test
feeds the simulated half (`--resimulate`) a recorded run made up here: a step log whose steps
cost 20 ms + 1 ms a batched token, and a sweep whose latencies are what that costs."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

from controller.profile import step_line
from controller.step import StepRecord

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ["off", "fixed:1", "fixed:3", "smartspec"]


def recorded_run(out: Path) -> None:
    lines = [json.dumps({"config": {"cache": {"block_size": 16, "kv_cache_tokens": 16384}, "scheduler": {}}})]
    t = 0.0
    for i in range(400):
        b, k = 1 + i % 4, i % 3
        verify = 20.0 + 1.0 * b * (1 + k)
        propose = 2.0 * k + 1.0 if k else 0.0
        record = StepRecord(
            batch_size=b,
            num_batched_tokens=b * (1 + k),
            num_kv_tokens=200 * b,
            verify_ms=verify,
            planned_k=(k,) * b,
            propose_ms=propose,
            draft_ms=2.0 * k,
            step_ms=verify + propose + 0.3,
        )
        t += (record.step_ms + 0.2) / 1e3
        lines.append(step_line(record, t))
    (out / "steps.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    points = []
    for rate in (1.0, 4.0):
        for policy in POLICIES:
            rounds = [] if policy == "off" else [(3, 3, 2), (3, 3, 0), (3, 3, 3)]
            requests = [
                {"send_s": i / rate, "prompt_tokens": 40, "completion_tokens": 24, "e2e_ms": 600.0,
                 "ttft_ms": 30.0, "rounds": rounds, "error": None}
                for i in range(6)
            ]  # fmt: skip
            started = t + 1.0 + len(points)  # after every logged step: each point fits on all 400
            points.append({"rate": rate, "policy": policy, "repeat": 0, "mean_e2e_ms": 600.0, "requests": requests,
                           "started_at": started, "ended_at": started + 0.5})  # fmt: skip
    live = {"date": "2026-12-01T00:00:00", "machine": {}, "workload": "draft-chat-code", "rates": [1.0, 4.0],
            "policies": POLICIES, "sweep_start": t + 1.0, "points": points}  # fmt: skip
    (out / "live.json").write_text(json.dumps(live))


def test_resimulating_a_recorded_run_writes_every_point_and_the_rankings(tmp_path):
    out = tmp_path / "simulate_validate_draft-chat-code"
    out.mkdir()
    recorded_run(out)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "simulate_validate.py"), "--workload", "draft-chat-code",
           "--resimulate", "--sim-seeds", "2", "--output-dir", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300)
    res = json.loads((out / "results.json").read_text())
    assert res["fitted"]["profiling_steps"] == 400
    assert abs(res["fitted"]["host_ms"] - 0.5) < 0.01 and abs(res["fitted"]["draft"]["step_ms"] - 2.0) < 0.01
    per_point = res["comparison"]["per_point"]
    assert len(per_point) == 8 and all(p["sim_ms"] > 0 and p["live_ms"] == 600.0 for p in per_point)
    assert [sorted(r["live_rank"]) for r in res["comparison"]["per_rate"]] == [sorted(POLICIES)] * 2
    assert "simulated / live" in (out / "table.md").read_text() and (out / "validation.png").exists()
