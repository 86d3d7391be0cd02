"""Faster nn.Linear on CPU for the few-row products of decoding and verification.

`F.linear(x, W)` asks MKL for x @ W^T with W as the transposed right operand.
For a handful of rows that path is slow on CPU (SmolLM2's 49152 x 576 head:
1 row 10 ms, 2 rows 22 ms, 3 rows 32 ms), and MKL's one-row product is slow
either way. Computing (W @ x^T)^T instead, with the row count padded up to a
power of two (at least 2, while at most 32), streams W once at memory speed
(2 to 4 rows: about 4.5 ms). Measured table: BENCHMARKS.md, "CPU linear layers".
The rows must reach the product row-major: the output of the layer before is a
transposed view, and fed as it is, the product is up to 4x slower.

The rows are independent, so padding only adds zero rows that are dropped.
GPUs keep `F.linear`: cuBLAS has no such cliff.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_PADDED_ROWS = 32


def padded_rows(n: int) -> int:
    """Rows the product is computed with for n input rows."""
    if n > MAX_PADDED_ROWS:
        return n
    return max(2, 1 << (n - 1).bit_length())


class CpuLinear(nn.Linear):
    """nn.Linear computed as (W @ x^T)^T over power-of-two row counts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])  # [n, in]
        n = rows.shape[0]
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


def use_cpu_linear(model: nn.Module) -> int:
    """Switches every plain nn.Linear of `model` to CpuLinear in place (weights and ties kept).

    Returns how many were switched.
    """
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CpuLinear
            switched += 1
    return switched
