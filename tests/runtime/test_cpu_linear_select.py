"""Choosing the CPU linear product by timing: the fastest wins, the decision is cached per machine
and measured afresh on another CPU or torch."""

from __future__ import annotations

import json

import torch
from torch import nn

from runtime.cpu_linear import MAX_ROWS, CpuLinear, kernels_for
from runtime.cpu_linear_select import ROW_BUCKETS, TIE, KernelSelector, choose, machine, time_products, use_cpu_linear


def timings(fast: dict[int, str]) -> dict:
    """Injected timings: at each bucket the named product takes 1 ms and the others 2 ms."""
    return {
        n: {k: (1.0 if fast.get(n, "linear") == k else 2.0) for k in ("linear", "transposed", "packed")}
        for n in ROW_BUCKETS
    }


def test_each_row_count_takes_the_fastest_product_of_its_bucket():
    plan = choose(timings({1: "transposed", 2: "transposed", 3: "packed", 4: "packed", 5: "packed", 64: "packed"}))
    assert len(plan) == MAX_ROWS + 1
    assert plan[1] == plan[2] == "transposed" and plan[3] == plan[4] == plan[5] == "packed"
    assert plan[6] == plan[7] == plan[8] == "linear"  # 7 rounds up to the 8-row bucket
    assert plan[49] == plan[MAX_ROWS] == "packed"  # 49..64 take the 64-row bucket's


def test_linear_keeps_a_count_it_nearly_ties():
    near = {n: {"linear": 1.0 + TIE / 2, "transposed": 1.0, "packed": 3.0} for n in ROW_BUCKETS}
    assert set(choose(near)) == {"linear"}
    clear = {n: {"linear": 1.0 + 2 * TIE, "transposed": 1.0, "packed": 3.0} for n in ROW_BUCKETS}
    assert set(choose(clear)) == {"transposed"}


class CountingTimer:
    """Injected timings per weight shape, counting the measurements asked for."""

    def __init__(self, fast: dict[int, str]):
        self.fast = fast
        self.calls: list[tuple] = []

    def __call__(self, weight, bias, buckets, kernels):
        self.calls.append(tuple(weight.shape))
        return timings(self.fast)


def layers():
    return [nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16, bias=False)]


def test_the_decision_is_cached_per_machine_and_measured_afresh_elsewhere(tmp_path):
    path = tmp_path / "cpu_linear.json"
    here = {"cpu": "AMD EPYC", "cores": 2, "threads": 2, "torch": "2.13.0+cpu"}
    timer = CountingTimer({1: "transposed"})
    plans = KernelSelector(path, timer, here).plans(layers())
    assert timer.calls == [(32, 16), (16, 32)]  # one measurement per distinct shape
    assert plans[0] == plans[1] and plans[0][1] == "transposed" and plans[0][2] == "linear"

    again = CountingTimer({1: "packed"})
    assert KernelSelector(path, again, here).plans(layers()) == plans  # a restart reuses the cached timings
    assert again.calls == []

    for changed in ({**here, "cpu": "Intel Xeon @ 2.80GHz"}, {**here, "torch": "2.14.0+cpu"}, {**here, "threads": 1}):
        other = CountingTimer({1: "packed"})
        assert KernelSelector(path, other, changed).plans(layers())[0][1] == "packed"
        assert len(other.calls) == 2
    assert len(json.loads(path.read_text())["machines"]) == 4  # every machine keeps its own


def test_an_unreadable_or_unwritable_cache_only_costs_a_measurement(tmp_path):
    path = tmp_path / "cpu_linear.json"
    path.write_text("{not json")
    timer = CountingTimer({})
    KernelSelector(path, timer, machine()).plans(layers())
    assert len(timer.calls) == 2
    blocked = tmp_path / "file"
    blocked.write_text("")
    KernelSelector(blocked / "cpu_linear.json", CountingTimer({}), machine()).plans(layers())  # warns, goes on


def test_auto_switches_every_layer_to_its_chosen_plan(tmp_path):
    model = nn.Sequential(*layers())
    selector = KernelSelector(tmp_path / "c.json", CountingTimer({1: "transposed", 2: "transposed"}), machine())
    assert use_cpu_linear(model, "auto", selector) == 3
    assert all(type(m) is CpuLinear and m.plan[1] == "transposed" and m.plan[3] == "linear" for m in model)


@torch.inference_mode()
def test_real_timings_cover_every_product_and_bucket():
    weight, bias = torch.randn(24, 8), torch.randn(24)
    measured = time_products(weight, bias, (1, 5), reps=3)
    assert set(measured) == {1, 5}
    assert all(set(t) == set(kernels_for(torch.float32)) and min(t.values()) > 0 for t in measured.values())
    assert set(choose({n: measured[5] for n in ROW_BUCKETS})) <= set(kernels_for(torch.float32))


def test_the_machine_key_names_the_cpu_and_torch():
    key = machine()
    assert key["cpu"] and key["cores"] >= 1 and key["torch"] == torch.__version__


def test_a_forced_choice_reaches_every_linear_layer_of_a_loaded_model(tiny_llama_dir):
    from runtime.models import Placement

    model = Placement(cpu_linear="transposed").load(tiny_llama_dir)
    plans = {m.plan for m in model.modules() if isinstance(m, nn.Linear)}
    assert plans == {("transposed",) * (MAX_ROWS + 1)}
