"""DeepSeek-V4's released weight encodings besides V3's: FP4 (E2M1) experts and power-of-two (UE8M0) scales.

    FP4 experts   int8 [..., R, K/2]: element 2j in the low nibble, 2j+1 in the high one; a nibble is E2M1
                  (sign, 2 exponent bits, 1 mantissa bit: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6})
                  scale float8_e8m0fnu [..., R, K/32]: one power of two per 32 consecutive values along K
    FP8 linears   float8_e4m3fn [R, K] with a float8_e8m0fnu scale per 128×128 block (V3's are fp32)

A weight is read back as value · scale. Every product is exact in fp32 (a 2-bit mantissa times a power of two).
"""

from __future__ import annotations

import torch

FP4_GROUP = 32  # values along K sharing one scale
E8M0 = torch.float8_e8m0fnu
FP4_MAX = 6.0
# the 16 nibbles' values: bit 3 the sign, bits 2..1 the exponent, bit 0 the mantissa
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 (or uint8) [..., K/2] → the E2M1 values [..., K] in fp32."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"FP4 weights are stored as int8, two values a byte; got {packed.dtype}")
    codes = packed.contiguous().view(torch.uint8)
    nibbles = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)  # low nibble first
    return _E2M1.to(packed.device).index_select(0, nibbles.reshape(-1).int()).view(nibbles.shape)


def _nearest_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale, |x| ≤ 6) → the nibble of the nearest E2M1 value (a tie: the smaller one)."""
    magnitudes = _E2M1[:8].to(x.device)
    code = (x.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Nibbles uint8 [..., K] (K even) → int8 [..., K/2], element 2j in the low nibble."""
    pairs = codes.view(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).view(torch.int8)


def pow2_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The smallest power of two s with amax / s ≤ top (1 where amax is 0), in fp32."""
    scale = torch.exp2(torch.ceil(torch.log2(amax.float() / top)))
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, K] (K a multiple of 32) → (int8 [..., R, K/2], float8_e8m0fnu [..., R, K/32]), as V4's experts."""
    *lead, k = w.shape
    if k % FP4_GROUP:
        raise ValueError(f"FP4 weights group {FP4_GROUP} values along K; K = {k} is not a multiple")
    groups = w.float().view(*lead, k // FP4_GROUP, FP4_GROUP)
    scale = pow2_scale(groups.abs().amax(dim=-1, keepdim=True), FP4_MAX)
    codes = _nearest_e2m1_codes(groups / scale).view(*lead, k)
    return pack_fp4(codes), scale.squeeze(-1).to(E8M0)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of quantize_fp4, in fp32: packed [..., R, K/2], scale [..., R, K/32]."""
    values = unpack_fp4(packed)
    if scale.shape[:-1] != values.shape[:-1] or scale.shape[-1] * FP4_GROUP != values.shape[-1]:
        raise ValueError(
            f"FP4 scale has shape {tuple(scale.shape)}, expected {(*values.shape[:-1], values.shape[-1] // FP4_GROUP)} "
            f"(one per {FP4_GROUP} values) for a weight of {values.shape[-1]} columns"
        )
    return (values.view(*scale.shape, FP4_GROUP) * scale.float().unsqueeze(-1)).view(values.shape)
