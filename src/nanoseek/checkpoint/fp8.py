"""DeepSeek-V3's released FP8 weight format: E4M3 values with one fp32 `weight_scale_inv` per 128×128 block.

Dequantized weight = block · weight_scale_inv; blocks at the edges of a matrix whose sides are not multiples of 128
are zero-padded before their scale is taken. Pure tensor code, so it runs on the CPU (the reference needs Hopper).
"""

from __future__ import annotations

import torch

BLOCK = 128
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[R, C] → zero-padded [R/b, b, C/b, b] view of blocks."""
    rows, cols = x.shape
    padded = torch.nn.functional.pad(x, (0, -cols % block, 0, -rows % block))
    return padded.view(padded.shape[0] // block, block, padded.shape[1] // block, block)


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [R, C] → (E4M3 [R, C], scale_inv fp32 [ceil(R/b), ceil(C/b)]), each block scaled to E4M3's range."""
    blocks = _blocks(weight.float(), block)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    quantized = (blocks / scale_inv).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    rows, cols = weight.shape
    quantized = quantized.view(blocks.shape[0] * block, blocks.shape[2] * block)[:rows, :cols].contiguous()
    return quantized, scale_inv.view(blocks.shape[0], blocks.shape[2])


def dequantize_blockwise(quantized: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The inverse of quantize_blockwise, in fp32."""
    rows, cols = quantized.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{rows}x{cols} weight in {block}x{block} blocks")
    blocks = _blocks(quantized.float(), block) * scale_inv.float()[:, None, :, None]
    return blocks.view(expected[0] * block, expected[1] * block)[:rows, :cols].contiguous()
