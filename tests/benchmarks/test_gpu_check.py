"""`benchmarks/gpu_check.py` is the one script a GPU session runs; here it runs on a CPU with tiny
shapes, so the code is known to work before device time is spent on it. The GPU numbers
themselves need a GPU: none is on the CI machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from controller.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_end_to_end_on_cpu_with_tiny_shapes(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_check.py"),
        "--tiny",
        "--device", "cpu",
        "--dtype", "float32",
        "--modes", "off",
        "--batch", "1,2",
        "--q", "1,5",
        "--ctx", "20",
        "--reps", "2",
        "--new-tokens", "6",
        "--ks", "0,1",
        "--compiled", "compile",  # what runs on a CPU; on a GPU it is compiled and captured
        "--compiled-models", "tiny-a",
        "--output-dir", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ceilings"]["copy_tb_s"] > 0
    assert set(results["models"]) == {"tiny-a", "tiny-b"}
    for model in results["models"].values():
        assert model["floor_ms"] > 0 and model["variant"] == "off/sdpa"
        assert model["paged"]["block_sizes"] == {"flash": None, "triton": None}  # no CUDA here: noted, skipped
        assert "CUDA" in model["paged"]["refused"]["triton 256"]
        assert {(r["B"], r["q"]) for r in model["rows"]} == {(1, 1), (1, 5), (2, 1), (2, 5)}
        assert all(r["ms"] > 0 and r["ctx"] == 20 for r in model["rows"])
        ops = model["profiles"]["off/sdpa"]["B=1 q=5"]  # where a profiled step's time went
        assert set(model["profiles"]["off/sdpa"]) == {"B=1 q=1", "B=1 q=5"} and ops[0]["cpu_ms"] > 0
    # Last, the compiled variant at the bars' shapes only, compared with eager like the others.
    compiled = results["models"]["tiny-a"]
    assert {(r["B"], r["q"]) for r in compiled["variants"]["compile/sdpa"]} == {(1, 1), (1, 5)}
    assert compiled["agreement"]["compile/sdpa"] < 1e-4 and "compile/sdpa" in compiled["profiles"]
    assert "compile/sdpa" not in results["models"]["tiny-b"]["variants"] and results["skipped"] == []
    steps = load_profile(f"{tmp_path / 'results.json'}#tiny-a")  # what the cost model and simulator read
    assert len(steps) == 4 and steps[0].verify_ms > 0
    assert set(results["tpot"]) == {"off/sdpa"} and results["tpot"]["off/sdpa"] > 0
    assert set(results["engine_start_s"]) == {"off/sdpa"}
    # No real target (as on the device): the pair's rounds are timed with a random SmolLM2-shaped
    # target, and each k's time per token projected from the real pair's tokens per round.
    assert set(results["pair"]) == {"0", "1"} and all(r["round_ms"] > 0 for r in results["pair"].values())
    assert results["pair"]["1"]["tokens_per_round"] < 1.5  # a random target accepts (almost) nothing
    for workload in ("code", "chat"):
        assert set(results["pair_projected"][workload]) == {"0", "1"}
        assert results["bars"][f"pair_best_k_over_off (projected, {workload})"]["value"] > 0
    assert results["errors"] == []
