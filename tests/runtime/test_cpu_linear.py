"""The CPU linear layer: every product equals F.linear, a forced product is used for every row
count, the packed weight follows the weight, and the layer behaves as nn.Linear otherwise."""

import copy

import pytest
import torch
from torch import nn

from runtime.cpu_linear import (
    CHOICES,
    KERNELS,
    MAX_ROWS,
    ONEDNN,
    PACKED_CHUNK,
    PACKED_COUNTS,
    CpuLinear,
    describe,
    kernels_for,
    packed_rows,
    padded_rows,
)
from runtime.cpu_linear_select import use_cpu_linear

needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
HERE = kernels_for(torch.float32)  # the products this torch build has


@pytest.mark.parametrize("n,rows", [(0, 2), (1, 2), (2, 2), (3, 4), (4, 4), (5, 8), (13, 16), (33, 64), (64, 64)])
def test_padded_rows(n, rows):
    assert padded_rows(n) == rows


@pytest.mark.parametrize("n,rows", [(1, 1), (16, 16), (17, 18), (33, 36), (100, 104), (1000, 1024), (1025, 1152)])
def test_packed_rows(n, rows):
    assert packed_rows(n) == rows


def test_packed_rows_pad_at_most_an_eighth_and_meet_few_counts():
    """oneDNN keeps a primitive per row count: a server's step sizes must map to few counts."""
    counts = [packed_rows(n) for n in range(1, 4097)]
    assert all(n <= rows <= n * 9 / 8 for n, rows in enumerate(counts, 1))
    assert len(set(counts)) == 16 + 8 * 8  # exact to 16, then 8 per octave up to 4,096


@needs_onednn
@torch.inference_mode()
def test_the_packed_product_meets_only_the_prebuilt_counts(monkeypatch):
    """oneDNN keeps a primitive per row count: any number of rows, chunked and padded, reaches
    it as one of PACKED_COUNTS, and prebuild ran each of those counts for each shape."""
    from runtime import cpu_linear

    met = []

    def recording(rows, packed, bias):
        met.append(rows.shape[0])
        return real(rows, packed, bias)

    real = cpu_linear.onednn_linear
    ref, fast = pair("packed", in_f=33, out_f=70)
    monkeypatch.setattr(cpu_linear, "onednn_linear", recording)
    assert cpu_linear.prebuild(nn.Sequential(fast, copy.deepcopy(fast))) == len(PACKED_COUNTS)  # one per shape
    assert sorted(met) == sorted(PACKED_COUNTS)
    met.clear()
    for n in (1, 17, 255, 256, 257, 600, 1500):
        x = torch.randn(n, 33)
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    assert set(met) <= set(PACKED_COUNTS) and max(met) == PACKED_CHUNK


def pair(kernel="transposed", in_f=7, out_f=11, bias=True):
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias)
    fast = nn.Linear(in_f, out_f, bias=bias)
    fast.load_state_dict(ref.state_dict())
    use_cpu_linear(fast, kernel)
    return ref, fast


@pytest.mark.parametrize("kernel", HERE)
@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_every_product_matches_linear_at_every_row_count(kernel, bias):
    ref, fast = pair(kernel, in_f=33, out_f=70, bias=bias)
    assert type(fast) is CpuLinear and set(fast.plan) == {kernel}
    for n in (*range(MAX_ROWS + 3), 100):
        x = torch.randn(n, 33)
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", HERE)
@pytest.mark.parametrize("shape", [(1, 7), (1, 4, 7), (1, 5, 7), (2, 9, 7), (0, 7)])
@torch.inference_mode()
def test_leading_dimensions_are_kept(kernel, shape):
    ref, fast = pair(kernel)
    x = torch.randn(*shape)
    y = fast(x)
    assert y.shape == (*shape[:-1], 11)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", HERE)
@pytest.mark.parametrize("n", [2, 4, 6])
@torch.inference_mode()
def test_takes_a_transposed_view_as_input(kernel, n):
    ref, fast = pair(kernel)
    x = torch.randn(7, n).t()  # [n, 7], not row-major: the output of the layer before
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_an_unknown_or_impossible_choice_is_refused():
    with pytest.raises(ValueError, match="cpu_linear must be one of auto, linear, transposed, packed"):
        use_cpu_linear(nn.Linear(3, 3), "fast")
    with pytest.raises(ValueError, match="packed needs float32"):
        use_cpu_linear(nn.Linear(3, 3).to(torch.bfloat16), "packed")
    assert CHOICES == ("auto", *KERNELS)


@torch.inference_mode()
def test_the_transposed_product_reaches_matmul_row_major():
    # Numbers are equal either way; the layout decides MKL's fast or slow path.
    from torch.overrides import TorchFunctionMode

    operands = []

    class RecordMatmul(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__"):
                operands.append(args[1])
            return func(*args, **(kwargs or {}))

    _, layer = pair("transposed")
    with RecordMatmul():
        layer(torch.randn(7, 4).t())  # a transposed view
        layer(torch.randn(3, 7))  # padded to 4 rows, built fresh
        layer(torch.randn(7, 9).t())
    assert len(operands) == 3 and all(op.t().is_contiguous() for op in operands)
    assert layer._packed is None  # only the packed product packs


@needs_onednn
@torch.no_grad()
def test_repacks_when_the_weight_changes_in_place_or_is_replaced():
    ref, fast = pair("packed")
    x = torch.randn(6, 7)
    fast(x)
    for layer in (ref, fast):
        layer.weight.mul_(2)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    new = torch.randn(11, 7)
    ref.weight.data, fast.weight.data = new.clone(), new.clone()
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_weight_made_under_inference_mode_is_repacked_when_replaced():
    with torch.inference_mode():
        ref, fast = pair("packed")
        x = torch.randn(6, 7)
        fast(x)
        new = torch.randn(11, 7)
        ref.weight.data, fast.weight.data = new.clone(), new.clone()
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_describe_names_each_run_of_row_counts():
    model = nn.Sequential(nn.Linear(7, 11), nn.Linear(11, 5, bias=False))
    use_cpu_linear(model, "linear")
    model[0].plan = ("transposed",) * 5 + ("linear",) * (MAX_ROWS - 4)
    assert describe(model) == [
        ("11x7:float32", "1-4", "transposed"),
        ("11x7:float32", "5+", "linear"),
        ("5x11:float32", "1+", "linear"),
    ]


def test_with_autograd_on_it_is_plain_linear_with_gradients():
    ref, fast = pair("transposed")
    x = torch.randn(3, 7)
    fast(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad)


@torch.inference_mode()
def test_a_used_layer_can_be_deep_copied():
    ref, fast = pair(HERE[-1])
    x = torch.randn(6, 7)
    fast(x)  # packed now, where this build can
    clone = copy.deepcopy(fast)
    assert type(clone) is CpuLinear
    torch.testing.assert_close(clone(x), ref(x), rtol=1e-5, atol=1e-5)


def test_switches_plain_linears_and_keeps_tied_weights():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(13, 4)
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 13, bias=False)
            self.head.weight = self.embed.weight
            self.norm = nn.LayerNorm(4)

    model = Tiny()
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        before = model.head(model.proj(model.embed(x)))
        assert use_cpu_linear(model, "transposed") == 2
        assert type(model.proj) is CpuLinear and type(model.head) is CpuLinear
        assert model.head.weight is model.embed.weight
        torch.testing.assert_close(model.head(model.proj(model.embed(x))), before)
    assert use_cpu_linear(model, "linear") == 0  # already switched
    assert set(model.proj.plan) == {"transposed"}


@pytest.mark.parametrize("kernel", kernels_for(torch.bfloat16))
@pytest.mark.parametrize("n", [2, 6])
@torch.inference_mode()
def test_bfloat16_layers_match_linear(kernel, n):
    torch.manual_seed(0)
    ref = nn.Linear(7, 11).to(torch.bfloat16)
    fast = copy.deepcopy(ref)
    use_cpu_linear(fast, kernel)
    x = torch.randn(n, 7, dtype=torch.bfloat16)
    torch.testing.assert_close(fast(x), ref(x), rtol=2e-2, atol=2e-2)


def test_the_cpu_runner_switches_the_models_linear_layers(tiny_llama_dir):
    from runtime.model_runner import ModelRunner
    from runtime.models import load_model

    model = load_model(tiny_llama_dir)
    ModelRunner(model, num_blocks=4, block_size=16)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {CpuLinear}


@pytest.mark.parametrize("kernel", HERE)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@torch.inference_mode()
def test_chained_layers_take_the_transposed_output_of_the_one_before(kernel, n):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(7, 11), nn.SiLU(), nn.Linear(11, 5))
    fast = copy.deepcopy(ref)
    use_cpu_linear(fast, kernel)
    x = torch.randn(1, n, 7)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
