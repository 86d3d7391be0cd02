"""nn.Linear on CPU with the product chosen per row count, by measuring on the running machine.

Decoding and verification multiply a handful of rows by every weight, and which
product is fastest for few rows depends on the CPU and its BLAS: on one 2-core
AMD EPYC, MKL's `F.linear` took 10 ms for one row of SmolLM2's 49152 x 576 output
layer where (W @ x^T)^T took 4; on a 2-core Intel Xeon the same `F.linear` was the
fastest product below 5 rows. So the layer has three products and uses, for each
weight shape and row count, the one `runtime.cpu_linear_select` measured fastest
here (or the one forced with `--cpu-linear`):

- `linear`: `F.linear`, what nn.Linear does.
- `transposed`: (W @ x^T)^T, which streams W once at memory speed where MKL's
  few-row x @ W^T does not. Up to MAX_ROWS rows are padded to a power of two (at
  least 2): MKL's cost for it is a staircase with steps at powers of two (13 rows
  cost 1.5x 16 on the EPYC), so a padded count costs what the step's top costs,
  which is also the count the selection times. The rows must reach the product
  row-major: the output of the layer before is a transposed view, and fed as it
  is, the product is up to 4x slower.
- `packed`: oneDNN's inner product over a copy of W packed once for its blocking
  (the kernel torch's own compiler uses for frozen CPU linears). float32 only.
  oneDNN builds (and JIT-compiles) a primitive for every row count it meets and
  keeps up to 1,024 of them, a few hundred KiB each: fed a step's exact row
  count, every new prefill length grew the process by megabytes. So rows go in
  chunks of at most PACKED_CHUNK, the last padded to four significant bits (at
  most 1/8 more rows): every product meets one of PACKED_COUNTS, 48 counts, and
  `prebuild` runs each once per weight shape when a model runner is built, so a
  server's memory is flat from its first request and no request waits for a JIT.

The packed copy is made on the first packed product, and again whenever the
weight is replaced or changed in place (its storage or version counter moved; a
weight made under inference mode has no version counter, so only replacing it
counts). It costs one more copy of each such layer's weights in memory. With
autograd on, the layer computes F.linear as nn.Linear does. GPUs keep `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("linear", "transposed", "packed")
CHOICES = ("auto", *KERNELS)
MAX_ROWS = 64  # row counts above this use the product chosen for MAX_ROWS
PACKED_CHUNK = 256  # the packed product's most rows per call

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def padded_rows(n: int) -> int:
    """Rows the transposed product is computed with for n <= MAX_ROWS input rows."""
    return max(2, 1 << (n - 1).bit_length())


def packed_rows(n: int) -> int:
    """Rows the packed product is computed with for n input rows."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


PACKED_COUNTS = tuple(sorted({packed_rows(n) for n in range(1, PACKED_CHUNK + 1)}))


def kernels_for(dtype: torch.dtype) -> tuple[str, ...]:
    """The products a weight of this dtype can use here."""
    return KERNELS if ONEDNN and dtype == torch.float32 else KERNELS[:2]


class CpuLinear(nn.Linear):
    """nn.Linear whose product is chosen per row count: `plan[n]` names it for n rows (n <= MAX_ROWS)."""

    plan: tuple[str, ...] = ("linear",) * (MAX_ROWS + 1)
    _packed: torch.Tensor | None = None
    _packed_from: tuple[int, int] | None = None  # (data_ptr, version) of the weight it was packed from

    def packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), -1 if w.is_inference() else w._version)  # inference tensors keep no version
        if self._packed is None or self._packed_from != key:
            self._packed = pack(w)
            self._packed_from = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compiled, the compiler chooses and packs the product itself (oneDNN's opaque packed
        # weights do not trace, and a row-count plan would specialise the graph on its rows).
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])  # [n, in]
        kernel = self.plan[min(rows.shape[0], MAX_ROWS)]
        if kernel == "linear":
            return F.linear(x, self.weight, self.bias)
        packed = self.packed_weight() if kernel == "packed" else None
        y = product(self.weight, self.bias, rows, kernel, packed)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def __getstate__(self):
        # The packed copy is an opaque oneDNN tensor: deepcopy and pickle cannot copy it. It is rebuilt on use.
        state = super().__getstate__()
        state.pop("_packed", None)
        state.pop("_packed_from", None)
        return state


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered for oneDNN's inner product (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def onednn_linear(rows: torch.Tensor, packed: torch.Tensor, bias) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


def product(weight, bias, rows: torch.Tensor, kernel: str, packed: torch.Tensor | None = None) -> torch.Tensor:
    """rows [n, in] times weight^T plus bias by the named product: [n, out]. `packed`: pack(weight)."""
    if kernel == "linear":
        return F.linear(rows, weight, bias)
    n = rows.shape[0]
    if kernel == "packed":
        if n > PACKED_CHUNK:
            chunks = rows.split(PACKED_CHUNK)
            return torch.cat([product(weight, bias, chunk, kernel, packed) for chunk in chunks])
        if n < packed_rows(n):
            rows = torch.cat([rows, rows.new_zeros(packed_rows(n) - n, rows.shape[1])])
        return onednn_linear(rows, packed, bias)[:n]
    if 0 < n < padded_rows(n) and n <= MAX_ROWS:
        rows = torch.cat([rows, rows.new_zeros(padded_rows(n) - n, rows.shape[1])])
    # A transposed view (the output of the layer before) as the right operand takes
    # MKL's slow path: SmolLM2's down_proj at 2 rows, 120 -> 520 us.
    y = (weight @ rows.contiguous().t()).t()[:n]
    return y + bias if bias is not None else y


@torch.inference_mode()
def prebuild(model: nn.Module) -> int:
    """Packs every layer that uses the packed product and runs that product once at each
    count of PACKED_COUNTS it will meet, once per weight shape: oneDNN's primitives (and
    the packed copies) exist before the first request. Returns how many products ran."""
    shapes = set()
    ran = 0
    for m in model.modules():
        if not isinstance(m, CpuLinear) or "packed" not in m.plan:
            continue
        packed = m.packed_weight()
        shape = (m.out_features, m.in_features, m.weight.dtype, m.bias is not None)
        if shape in shapes:
            continue
        shapes.add(shape)
        for count in PACKED_COUNTS:
            if m.plan[min(count, MAX_ROWS)] == "packed":
                product(m.weight, m.bias, m.weight.new_zeros(count, m.in_features), "packed", packed)
                ran += 1
    return ran


def describe(model: nn.Module) -> list[tuple[str, str, str]]:
    """(weight shape, row range, product) for each run of row counts sharing a product, per
    distinct shape and dtype of the model's CpuLinear layers: what the metrics and logs show."""
    rows = []
    seen = set()
    for m in model.modules():
        if not isinstance(m, CpuLinear):
            continue
        shape = f"{m.out_features}x{m.in_features}:{str(m.weight.dtype).removeprefix('torch.')}"
        if shape in seen:
            continue
        seen.add(shape)
        starts = [n for n in range(1, MAX_ROWS + 1) if n == 1 or m.plan[n] != m.plan[n - 1]]
        for start, end in zip(starts, [n - 1 for n in starts[1:]] + [None]):
            label = f"{start}+" if end is None else f"{start}" if start == end else f"{start}-{end}"
            rows.append((shape, label, m.plan[start]))
    return rows
