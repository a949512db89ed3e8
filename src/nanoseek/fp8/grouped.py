"""The experts' grouped GEMMs in FP8 on CUDA, through torch._scaled_grouped_mm (Hopper and later).

Its FP8 path takes row-wise scales only: one per row of the left operand over all of K, one per expert and output
column of the right. That is the recipe here, the closest the kernel comes to DeepSeek's 1×128 tiles and 128×128
blocks (which the exact emulation in linear.py follows, and which CPUs and the `emulate` backend run):

    Fprop  y = x · W[g]ᵀ        x: a scale per token          W[g]: a scale per output channel
    Dgrad  dx = dy · W[g]       dy: a scale per token         W[g]ᵀ: a scale per input channel
    Wgrad  dW[g] = dy_gᵀ · x_g  128×1 token tiles per expert as in the emulation, dequantized, bf16 grouped GEMM
                                (no FP8 path of the kernel restarts its scales at each expert's first token)

The kernel accumulates in fp32 and writes bf16. Where it refuses (an older GPU, torch or driver), that is said once
and the emulation takes over."""

from __future__ import annotations

import warnings

import torch

from nanoseek.fp8.quant import _scale_for, _to_e4m3

_refused: list[str] = []  # why this machine's torch._scaled_grouped_mm cannot serve, once it has said so


def quantize_rows(x: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] → (E4M3 [..., K], fp32 scale [...]): one scale per row, from its max-abs."""
    scale = _scale_for(x.abs().amax(dim=-1), pow2)
    return _to_e4m3(x, scale.unsqueeze(-1)), scale


def scaled_grouped_mm(
    x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor, pow2: bool
) -> torch.Tensor | None:
    """x [N, in] (rows sorted by expert) @ weight[g]ᵀ, weight [G, out, in] → [N, out] bf16 by the FP8 kernel, both
    operands quantized row-wise; None where the kernel refuses."""
    if _refused:
        return None
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[1], dtype=torch.bfloat16)
    qx, sx = quantize_rows(x, pow2)
    qw, sw = quantize_rows(weight, pow2)  # [G, out, in], scales [G, out]
    try:  # the kernel wants the right operand column-major: [G, in, out] with unit stride along `in`
        return torch._scaled_grouped_mm(
            qx, qw.transpose(1, 2), sx, sw, offs=group_ends.to(torch.int32), out_dtype=torch.bfloat16
        )
    except RuntimeError as e:  # NotImplementedError (no kernel for this device) is a RuntimeError too
        _refused.append(str(e).splitlines()[0])
        warnings.warn(
            f"torch._scaled_grouped_mm refused the experts' FP8 GEMM ({_refused[0]}); using the exact "
            "emulation from now on (slower)",
            stacklevel=2,
        )
        return None
