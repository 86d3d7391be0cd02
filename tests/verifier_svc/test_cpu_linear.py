import pytest
import torch
from torch import nn

from verifier_svc.cpu_linear import CpuLinear, padded_rows, use_cpu_linear


@pytest.mark.parametrize("n,rows", [(1, 2), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (32, 32), (33, 33), (100, 100)])
def test_padded_rows(n, rows):
    assert padded_rows(n) == rows


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 7), (3, 7), (1, 5, 7), (2, 9, 7), (40, 7)])
def test_matches_linear(bias, shape):
    torch.manual_seed(0)
    ref = nn.Linear(7, 11, bias=bias)
    fast = nn.Linear(7, 11, bias=bias)
    fast.load_state_dict(ref.state_dict())
    fast.__class__ = CpuLinear
    x = torch.randn(*shape)
    y = fast(x)
    assert y.shape == (*shape[:-1], 11)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


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
    before = model.head(model.proj(model.embed(x)))
    assert use_cpu_linear(model) == 2
    assert type(model.proj) is CpuLinear and type(model.head) is CpuLinear
    assert model.head.weight is model.embed.weight
    torch.testing.assert_close(model.head(model.proj(model.embed(x))), before)
    assert use_cpu_linear(model) == 0  # already switched


def test_the_cpu_runner_switches_the_models_linear_layers(tiny_llama_dir):
    from smartspec.models import load_model
    from verifier_svc.model_runner import ModelRunner

    model = load_model(tiny_llama_dir)
    ModelRunner(model, num_blocks=4, block_size=16)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {CpuLinear}


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_chained_layers_take_the_transposed_output_of_the_one_before(n):
    # CpuLinear returns a transposed view; the next layer must accept that layout.
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(7, 11), nn.SiLU(), nn.Linear(11, 5))
    fast = nn.Sequential(nn.Linear(7, 11), nn.SiLU(), nn.Linear(11, 5))
    fast.load_state_dict(ref.state_dict())
    use_cpu_linear(fast)
    x = torch.randn(1, n, 7)
    assert not fast[0](x).is_contiguous()
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_the_product_gets_row_major_rows():
    # Numbers are equal either way; the layout decides MKL's fast or slow path.
    from torch.overrides import TorchFunctionMode

    operands = []

    class RecordMatmul(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__"):
                operands.append(args[1])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = nn.Linear(7, 11)
    use_cpu_linear(layer)
    transposed_view = torch.randn(7, 4).t()  # [4, 7], like the output of the layer before
    with RecordMatmul():
        layer(transposed_view)
        layer(torch.randn(3, 7))  # padded to 4 rows, built fresh
    assert len(operands) == 2 and all(op.t().is_contiguous() for op in operands)
