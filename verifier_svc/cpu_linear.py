"""Faster nn.Linear on CPU for the few-row products of decoding and verification.

`F.linear(x, W)` asks MKL for x @ W^T with W as the transposed right operand.
For a handful of rows that path is slow on CPU (SmolLM2's 49152 x 576 head:
1 row 10 ms, 2 rows 22 ms, 3 rows 32 ms), and MKL's one-row product is slow
either way. Two products replace it, each where it measured fastest
(BENCHMARKS.md, "CPU linear layers"):

- 1 to 4 rows: (W @ x^T)^T with the rows padded to 2 or 4, which streams W
  once at memory speed (all of SmolLM2's layers: about 21 ms for 1 or 2 rows).
  The rows must reach the product row-major: the output of the layer before
  is a transposed view, and fed as it is, the product is up to 4x slower.
- 5 rows and more: oneDNN's inner product over a copy of W packed once for
  its blocking (the kernel torch's own compiler uses for frozen CPU linears),
  which stays near the memory-speed cost up to about 8 rows where MKL's
  products double (5 to 16 rows: 27 to 40 ms against 44 to 65 ms).

The packed copy is made on the first product of 5 rows or more, and again
whenever the weight is replaced or changed in place (its storage or version
counter moved; a weight made under inference mode has no version counter, so
only replacing it counts). It costs one more copy of each layer's weights in
memory. With autograd on, the layer computes F.linear as nn.Linear does.
The packed product is float32 only: other dtypes take F.linear above 4 rows.
GPUs keep `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_ROWS = 4  # up to this many rows, (W @ x^T)^T; above, the packed product

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def padded_rows(n: int) -> int:
    """Rows the (W @ x^T)^T product is computed with for n <= SMALL_ROWS input rows."""
    return max(2, 1 << (n - 1).bit_length())


class CpuLinear(nn.Linear):
    """nn.Linear computed as (W @ x^T)^T for few rows and by oneDNN over a packed weight for more."""

    _packed: torch.Tensor | None = None
    _packed_from: tuple[int, int] | None = None  # (data_ptr, version) of the weight it was packed from

    def packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), -1 if w.is_inference() else w._version)  # inference tensors keep no version
        if self._packed is None or self._packed_from != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self._packed_from = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])  # [n, in]
        n = rows.shape[0]
        if torch.is_grad_enabled() or (n > SMALL_ROWS and not (ONEDNN and self.weight.dtype == torch.float32)):
            return F.linear(x, self.weight, self.bias)
        if n > SMALL_ROWS:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight(), self.bias, "none", [], "")
        else:
            pad = padded_rows(n) - n
            if pad:
                rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
            else:
                # A transposed view (the output of the layer before) as the right operand
                # takes MKL's slow path: SmolLM2's down_proj at 2 rows, 120 -> 520 us.
                rows = rows.contiguous()
            y = (self.weight @ rows.t()).t()[:n]  # [n, out]
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, y.shape[-1])

    def __getstate__(self):
        # The packed copy is an opaque oneDNN tensor: deepcopy and pickle cannot copy it. It is rebuilt on use.
        state = super().__getstate__()
        state.pop("_packed", None)
        state.pop("_packed_from", None)
        return state


def use_cpu_linear(model: nn.Module) -> int:
    """Switches every plain CPU nn.Linear of `model` to CpuLinear in place (weights and ties kept).

    Returns how many were switched.
    """
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu":
            module.__class__ = CpuLinear
            switched += 1
    return switched
