"""FP8 linear layers (DeepSeek-V3 §3.3.1): the forward GEMM (Fprop), the input gradient (Dgrad) and the weight gradient
(Wgrad) all take E4M3 operands with fine-grained scales and accumulate in fp32.

    Fprop  y  = x · Wᵀ     x: 1×128 tiles (per token)       W: 128×128 blocks
    Dgrad  dx = dy · W     dy: 1×128 tiles (per token)      W: the same blocks, transposed
    Wgrad  dW = dyᵀ · x    dy: 128×1 tiles (per channel)    x: 128×1 tiles, re-tiled from the FP8 copy kept for it

What backward keeps of x is its FP8 copy and scales (a quarter of fp32), as in the report. Master weights, their
gradients and the layer's output stay in the caller's precision. The experts' grouped GEMMs follow the same recipe,
with Wgrad's token tiles restarting at each expert's first token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.fp8.gemm import fp8_mm, resolve_backend
from nanoseek.fp8.grouped import scaled_grouped_mm
from nanoseek.fp8.quant import (
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_grouped_tiles,
    quantize_tiles,
)
from nanoseek.models.common.moe import grouped_mm


@dataclass(frozen=True)
class Fp8Recipe:
    pow2_scales: bool = False  # round every scale up to a power of two
    backend: str = "auto"  # GEMM backend: auto (scaled_mm on CUDA, emulate elsewhere), emulate, scaled_mm

    def __post_init__(self) -> None:
        resolve_backend(self.backend, torch.device("cpu"))  # rejects an unknown name at construction


class _Fp8Matmul(torch.autograd.Function):
    """x [M, K] @ weight [N, K]ᵀ → [M, N] in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
        backend, pow2 = resolve_backend(recipe.backend, x.device), recipe.pow2_scales
        with torch.autocast(x.device.type, enabled=False):  # the GEMM's precision is ours to choose, not autocast's
            qx, sx = quantize_tiles(x, pow2)
            qw, sw = quantize_blocks(weight, pow2)
            y = fp8_mm(qx, sx, qw, sw, backend, b_blocks=True)
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.backend, ctx.pow2, ctx.x_dtype, ctx.w_dtype = backend, pow2, x.dtype, weight.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        qx, sx, qw, sw = ctx.saved_tensors
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                qg, sg = quantize_tiles(dy, ctx.pow2)
                dx = fp8_mm(qg, sg, qw.t().contiguous(), sw.t().contiguous(), ctx.backend, b_blocks=True)
                dx = dx.to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                qgt, sgt = quantize_tiles(dy.t(), ctx.pow2)
                qxt, sxt = quantize_tiles(dequantize_tiles(qx, sx).t(), ctx.pow2)
                dw = fp8_mm(qgt, sgt, qxt, sxt, ctx.backend).to(ctx.w_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """F.linear (no bias) through FP8 GEMMs; x [..., K]."""
    y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, recipe)
    return y.view(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Linear):
    """nn.Linear (no bias) whose GEMMs run in FP8; same parameter, so checkpoints do not change."""

    recipe: Fp8Recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe) -> Fp8Linear:
        if linear.bias is not None:
            raise ValueError("FP8 linear layers take no bias (DeepSeek's have none)")
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight, new.recipe = linear.weight, recipe
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.recipe)


def _aligned_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm(a [M, K], b [K, N]) with K groups (the weight gradient of every expert at once), in their dtype.
    The kernels want 16-byte aligned rows: M, N and K are zero-padded (the last group absorbs K's zero columns,
    adding nothing) and the padding is cut off again."""
    (m, k), n = a.shape, b.shape[1]
    if k == 0:  # no tokens reached these experts (possible on an expert-parallel rank): zero gradients
        return a.new_zeros(len(offs), m, n)
    align = 16 // a.element_size()
    a = F.pad(a, (0, -k % align, 0, -m % align))
    b = F.pad(b, (0, -n % align, 0, -k % align))
    offs = torch.cat([offs[:-1], offs.new_full((1,), a.shape[1])])
    return F.grouped_mm(a, b, offs=offs)[:, :m, :n]


class _Fp8GroupedMatmul(torch.autograd.Function):
    """x [N, in] (rows sorted by expert) @ weight[g]ᵀ for each expert g, weight [G, out, in] → [N, out]. On CUDA
    (backend scaled_mm) Fprop and Dgrad run torch._scaled_grouped_mm with row-wise scales (fp8/grouped.py);
    elsewhere, or where that kernel refuses, the exact emulation of the tiled recipe."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor, recipe: Fp8Recipe
    ) -> torch.Tensor:
        pow2 = recipe.pow2_scales
        kernel = resolve_backend(recipe.backend, x.device) == "scaled_mm" and x.is_cuda
        with torch.autocast(x.device.type, enabled=False):
            qx, sx = quantize_tiles(x, pow2)  # Wgrad's operand, whichever path runs
            y = scaled_grouped_mm(x, weight, group_ends, pow2) if kernel else None
            ctx.kernel = y is not None
            if y is None:
                qw, sw = quantize_blocks(weight, pow2)
                y = grouped_mm(dequantize_tiles(qx, sx), dequantize_blocks(qw, sw), group_ends)
                ctx.save_for_backward(qx, sx, group_ends, qw, sw)
            else:  # Dgrad quantizes the weight's transpose itself: keep the parameter, not a copy
                ctx.save_for_backward(qx, sx, group_ends, weight)
        ctx.pow2, ctx.x_dtype, ctx.w_dtype = pow2, x.dtype, weight.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        qx, sx, group_ends, *weights = ctx.saved_tensors
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                if ctx.kernel:
                    dx = scaled_grouped_mm(dy, weights[0].transpose(1, 2).contiguous(), group_ends, ctx.pow2)
                if dx is None:
                    qw, sw = weights if not ctx.kernel else quantize_blocks(weights[0], ctx.pow2)
                    qg, sg = quantize_tiles(dy, ctx.pow2)
                    dx = grouped_mm(dequantize_tiles(qg, sg), dequantize_blocks(qw, sw).transpose(1, 2), group_ends)
                dx = dx.to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                # on CUDA the dequantized operands go through the bf16 grouped GEMM (an fp32 one reads its group
                # offsets on the host); elsewhere fp32, exact
                dtype = torch.bfloat16 if dy.is_cuda else torch.float32
                qgt, sgt = quantize_grouped_tiles(dy.t(), group_ends, ctx.pow2)
                qxt, sxt = quantize_grouped_tiles(dequantize_tiles(qx, sx).t(), group_ends, ctx.pow2)
                dw = _aligned_grouped_mm(
                    dequantize_tiles(qgt, sgt).to(dtype), dequantize_tiles(qxt, sxt).t().to(dtype), group_ends
                )
                dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """The FP8 counterpart of nanoseek.models.common.moe.grouped_mm (same arguments)."""
    return _Fp8GroupedMatmul.apply(x, weight, group_ends, recipe)


def grouped_gemm_for(recipe: Fp8Recipe) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    return partial(fp8_grouped_mm, recipe=recipe)
