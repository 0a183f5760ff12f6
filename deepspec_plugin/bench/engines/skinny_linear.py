"""Linear layers for decoding on a CPU in fp32: a few rows times every weight, weights read once.

A decoding forward multiplies a few rows (one per sequence for a plain step, k + 1 for a
verification) by every weight matrix, so its time is the time to stream the weights from memory.
torch hands fp32 ``F.linear`` (x @ W^T) to MKL, which on this project's CPUs (AMD EPYC, 2 cores)
takes slow paths for few rows: the 1-row product (sgemv) streams at half the speed of W @ x^T with
2 columns, and 2 to 8 rows cost 1.6-2x one row, where the weights alone would cost about 1x.
Computing W @ x^T instead, with a single row padded to two, makes a SmolLM2-135M step about 1.8x
faster and a 2-token verification cost about 1.1x a step instead of 1.65x
(``benchmarks/decode_matmul.py`` measures both side by side).

`use_skinny_linears` switches the ``nn.Linear`` modules of a model to `SkinnyLinear` in place (same
parameters, same state dict; the reference engine does it unless told not to); prefill and
training (many rows), other dtypes (bf16 already goes to oneDNN, which does well here) and other
devices keep ``F.linear``. Results equal ``F.linear``'s up
to float rounding (another summation order), as any two BLAS kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 8  # beyond this the two products cost about the same here


class SkinnyLinear(nn.Linear):
    """``nn.Linear`` computing W @ x^T for up to `MAX_ROWS` rows of fp32 on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not (0 < rows <= MAX_ROWS and w.dtype == torch.float32 and x.dtype == torch.float32
                and w.device.type == "cpu"):
            return F.linear(x, w, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:  # one column is MKL's slow sgemv: two are a fast gemm
            flat = torch.cat([flat, torch.zeros_like(flat)])
        else:
            flat = flat.contiguous()
        out = torch.mm(w, flat.t()).t()[:rows]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], w.shape[0])


def use_skinny_linears(module: nn.Module | None, on: bool = True) -> int:
    """Switch every plain ``nn.Linear`` in ``module`` to `SkinnyLinear` (``on=False``: back), in
    place; returns how many layers are `SkinnyLinear` afterwards. Subclasses (LoRA layers,
    quantised linears) are left alone."""
    if module is None:
        return 0
    for m in module.modules():
        if type(m) in (nn.Linear, SkinnyLinear):
            m.__class__ = SkinnyLinear if on else nn.Linear
    return sum(type(m) is SkinnyLinear for m in module.modules())


def uses_skinny_linears(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, SkinnyLinear) for m in module.modules())
