"""Choosing the CPU linear product by timing: the fastest wins, the decision is cached per machine
and measured afresh on another CPU or torch."""

from __future__ import annotations

import json

import torch
from torch import nn

from runtime.cpu_linear import MAX_ROWS, CpuLinear, kernels_for
from runtime.cpu_linear_select import (
    BUCKETS,
    TIE,
    TIMED_PER_SHAPE,
    TIMED_ROWS,
    KernelSelector,
    choose,
    machine,
    parse_cpuinfo,
    shape_key,
    time_products,
    use_cpu_linear,
)


def timings(fast: dict[int, str]) -> dict:
    """Injected timings: at each timed row count the named product takes 1 ms and the others 2 ms."""
    return {
        n: {k: (1.0 if fast.get(n, "linear") == k else 2.0) for k in ("linear", "transposed", "packed")}
        for n in TIMED_ROWS
    }


def test_each_row_count_takes_the_fastest_product_of_its_bucket():
    [plan] = choose(
        {"s": timings({1: "transposed", 2: "transposed", 3: "packed", 5: "packed", 8: "packed", 64: "packed"})}
    ).values()
    assert len(plan) == MAX_ROWS + 1 and BUCKETS[-1] == (33, MAX_ROWS)
    assert plan[0] == plan[1] == plan[2] == "transposed" and plan[3] == "packed" and plan[4] == "linear"
    assert set(plan[5:9]) == {"packed"}  # fastest at both ends of 5-8
    assert set(plan[9:33]) == {"linear"}


def test_a_bucket_goes_to_the_least_time_over_both_its_ends():
    # Padded to 32, the transposed product costs the same at 17 and 32 rows; the packed one grows.
    flat_vs_growing = {
        17: {"linear": 9.0, "transposed": 5.0, "packed": 3.0},
        32: {"linear": 9.0, "transposed": 5.0, "packed": 6.0},
    }
    assert set(choose({"s": flat_vs_growing})["s"][17:33]) == {
        "packed"
    }  # 9 against 10, though the top alone favours transposed
    steep = {
        17: {"linear": 9.0, "transposed": 5.0, "packed": 3.0},
        32: {"linear": 9.0, "transposed": 5.0, "packed": 8.0},
    }
    assert set(choose({"s": steep})["s"][17:33]) == {"transposed"}


def test_the_model_takes_one_product_and_a_shape_its_own_only_for_a_clear_gain():
    big = {n: {"linear": 10.0, "transposed": 6.0, "packed": 9.5} for n in TIMED_ROWS}
    small_noisy = {n: {"linear": 1.0, "transposed": 1.05, "packed": 0.98} for n in TIMED_ROWS}
    small_clear = {n: {"linear": 1.0, "transposed": 1.5, "packed": 0.6} for n in TIMED_ROWS}
    plans = choose({"big": big, "noisy": small_noisy, "clear": small_clear}, {"big": 1, "noisy": 30, "clear": 1})
    assert set(plans["big"]) == set(plans["noisy"]) == {"transposed"}  # 6 + 31.5 + 1.5 beats 9.5 + 29.4 + 0.6
    assert set(plans["clear"]) == {"packed"}  # 0.6 against 1.5: its own


def test_linear_keeps_a_count_it_nearly_ties():
    near = {n: {"linear": 1.0 + TIE / 2, "transposed": 1.0, "packed": 3.0} for n in TIMED_ROWS}
    assert set(choose({"s": near})["s"]) == {"linear"}
    clear = {n: {"linear": 1.0 + 2 * TIE, "transposed": 1.0, "packed": 3.0} for n in TIMED_ROWS}
    assert set(choose({"s": clear})["s"]) == {"transposed"}


class CountingTimer:
    """Injected timings for every weight shape, recording the layers it was asked to time."""

    def __init__(self, fast: dict[int, str]):
        self.fast = fast
        self.calls: list[list[tuple]] = []

    def __call__(self, layers, buckets):
        self.calls.append([tuple(m.weight.shape) for m in layers])
        return {shape_key(m): timings(self.fast) for m in layers}


def layers():
    return [nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16, bias=False)]


def test_the_decision_is_cached_per_machine_and_measured_afresh_elsewhere(tmp_path):
    path = tmp_path / "cpu_linear.json"
    here = {"cpu": "AMD EPYC", "cores": 2, "threads": 2, "torch": "2.13.0+cpu"}
    timer = CountingTimer({1: "transposed"})
    plans = KernelSelector(path, timer, here).plans(layers())
    assert timer.calls == [[(32, 16), (32, 16), (16, 32)]]  # one measurement, all layers in their order
    assert plans[0] == plans[1] and plans[0][1] == "transposed" and plans[0][2] == "linear"

    again = CountingTimer({1: "packed"})
    assert KernelSelector(path, again, here).plans(layers()) == plans  # a restart reuses the cached timings
    assert again.calls == []

    for changed in ({**here, "cpu": "Intel Xeon @ 2.80GHz"}, {**here, "torch": "2.14.0+cpu"}, {**here, "threads": 1}):
        other = CountingTimer({1: "packed"})
        assert KernelSelector(path, other, changed).plans(layers())[0][1] == "packed"
        assert len(other.calls) == 1
    assert len(json.loads(path.read_text())["machines"]) == 4  # every machine keeps its own


def test_an_unreadable_or_unwritable_cache_only_costs_a_measurement(tmp_path):
    path = tmp_path / "cpu_linear.json"
    path.write_text("{not json")
    timer = CountingTimer({})
    KernelSelector(path, timer, machine()).plans(layers())
    assert len(timer.calls) == 1
    blocked = tmp_path / "file"
    blocked.write_text("")
    KernelSelector(blocked / "cpu_linear.json", CountingTimer({}), machine()).plans(layers())  # warns, goes on


def test_auto_switches_every_layer_to_its_chosen_plan(tmp_path):
    model = nn.Sequential(*layers())
    selector = KernelSelector(tmp_path / "c.json", CountingTimer({1: "transposed", 2: "transposed"}), machine())
    assert use_cpu_linear(model, "auto", selector) == 3
    assert all(type(m) is CpuLinear and m.plan[1] == "transposed" and m.plan[3] == "linear" for m in model)


def test_real_timings_cover_every_shape_product_and_row_count():
    model = [nn.Linear(8, 24), nn.Linear(24, 8, bias=False), nn.Linear(8, 24), nn.Linear(8, 24).to(torch.bfloat16)]
    model += [nn.Linear(24, 8, bias=False) for _ in range(TIMED_PER_SHAPE)]  # more than are timed
    measured = time_products(model, (1, 5), reps=2)
    assert set(measured) == {"24x8+bias:float32", "8x24:float32", "24x8+bias:bfloat16"}
    for key, by_rows in measured.items():
        assert set(by_rows) == {1, 5}
        dtype = torch.bfloat16 if key.endswith("bfloat16") else torch.float32
        assert all(set(t) == set(kernels_for(dtype)) and min(t.values()) > 0 for t in by_rows.values())
    assert set(choose(measured)["8x24:float32"]) <= set(kernels_for(torch.float32))


def test_the_machine_key_names_the_cpu_and_torch():
    key = machine()
    assert key["cpu"] and key["cores"] >= 1 and key["torch"] == torch.__version__


def test_a_forced_choice_reaches_every_linear_layer_of_a_loaded_model(tiny_llama_dir):
    from runtime.models import Placement

    model = Placement(cpu_linear="transposed").load(tiny_llama_dir)
    plans = {m.plan for m in model.modules() if isinstance(m, nn.Linear)}
    assert plans == {("transposed",) * (MAX_ROWS + 1)}


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse4_2 avx avx2 fma

processor\t: 1
model name\t: something else
"""


def test_the_cpu_key_tells_apart_generations_that_share_a_name():
    zen3 = parse_cpuinfo(ZEN3)
    zen5 = parse_cpuinfo(
        ZEN3.replace(": 25", ": 26").replace(": 1\nmodel name", ": 2\nmodel name").replace("avx2", "avx2 avx512f")
    )
    assert zen3 == "AMD EPYC (family 25 model 1 stepping 1, avx2)"
    assert zen5 == "AMD EPYC (family 26 model 2 stepping 1, avx512f)"
    assert parse_cpuinfo("flags\t: avx2\n") == ""  # no name: the caller falls back to the platform's
