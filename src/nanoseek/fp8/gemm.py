"""FP8 GEMMs with fine-grained scales and fp32 accumulation.

Every operand arrives as E4M3 values plus one scale per row and 128-element tile of the contracting dimension K, or
(a weight) one per 128×128 block, so

    out[m, n] = Σ_kb  sa[m, kb] · sb[n, kb] · Σ_{k in tile kb} qa[m, k] · qb[n, k]

Backends:
- "scaled_mm" (CUDA): one blockwise-scaled `torch._scaled_mm` for the whole GEMM where the installed torch and
  cuBLAS take DeepSeek's 1×128 / 128×128 scales (CUDA 12.9+ on Hopper; its first result is checked against the
  per-tile path below before it is trusted); else one `torch._scaled_mm` per K tile with row-wise scales and an
  fp32 output, the tiles summed in fp32: the promotion to fp32 every 128 elements of K that V3 §3.3.2 adds because
  Hopper's tensor cores keep only ~14 bits of the running sum.
- "emulate" (CPU default): the operands are dequantized exactly to fp32 and multiplied in fp32. The products are the
  FP8 kernel's (E4M3 × E4M3 is exact in fp32); only the order of the fp32 additions differs.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from nanoseek.fp8.quant import TILE, dequantize_tiles


def row_scales(block_scale: torch.Tensor, rows: int) -> torch.Tensor:
    """128×128 block scales [R/128, K/128] as the per-row tile scales [R, K/128] the GEMMs take."""
    return block_scale.repeat_interleave(TILE, 0)[:rows]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "scaled_mm" if device.type == "cuda" else "emulate"
    if backend not in ("emulate", "scaled_mm"):
        raise ValueError(f"unknown FP8 GEMM backend {backend!r} (auto, emulate or scaled_mm)")
    return backend


_scaled_mm_refused: list[str] = []  # why this machine's torch._scaled_mm cannot serve, once it has said so


def fp8_mm(
    qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, backend: str, b_blocks: bool = False
) -> torch.Tensor:
    """qa [M, K], qb [N, K] in E4M3; sa [M, K/128] fp32; sb [N, K/128] (1×128 tiles) or, with b_blocks,
    [N/128, K/128] (128×128 blocks) → a·bᵀ [M, N] in fp32."""
    if backend == "scaled_mm" and not _scaled_mm_refused:
        out = _blockwise_scaled_mm(qa, sa, qb, sb, b_blocks)
        if out is not None:
            return out
    rows_b = row_scales(sb, qb.shape[0]) if b_blocks else sb  # one scale per row of b and K tile
    if backend == "scaled_mm" and not _scaled_mm_refused:
        try:
            return _tiled_scaled_mm(qa, sa, qb, rows_b)
        except RuntimeError as e:  # e.g. a cuBLAS too old for fp32 output with row-wise scales
            _scaled_mm_refused.append(str(e).splitlines()[0])
            warnings.warn(
                f"torch._scaled_mm refused the FP8 GEMM ({_scaled_mm_refused[0]}); using the exact "
                "emulation from now on (same numerics, slower)",
                stacklevel=2,
            )
    return dequantize_tiles(qa, sa) @ dequantize_tiles(qb, rows_b).t()


_blockwise_trusted: dict[bool, bool] = {}  # b_blocks → whether blockwise _scaled_mm matched the per-tile path


def _blockwise_scaled_mm(
    qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, b_blocks: bool
) -> torch.Tensor | None:
    """The whole GEMM as one `torch._scaled_mm` with (1×128, 128×128) or (1×128, 1×128) scales, bf16 out; None
    where this machine cannot (or its first result disagreed with the per-tile path, so that a scale layout read
    otherwise than meant can never pass silently)."""
    if _blockwise_trusted.get(b_blocks) is False or qa.device.type != "cuda":
        return None
    (m, k), n = qa.shape, qb.shape[0]
    if m % 16 or n % 128 or k % TILE:  # the blockwise kernels' shapes; anything else takes the per-tile path
        return None
    try:
        out = torch._scaled_mm(
            qa, qb.t(), scale_a=sa.contiguous(), scale_b=sb.t().contiguous(), out_dtype=torch.bfloat16
        ).float()
    except RuntimeError:
        _blockwise_trusted[b_blocks] = False
        return None
    if b_blocks not in _blockwise_trusted:
        reference = _tiled_scaled_mm(qa, sa, qb, row_scales(sb, n) if b_blocks else sb)
        scale = reference.abs().amax().clamp(min=1e-12)
        _blockwise_trusted[b_blocks] = bool(((out - reference).abs() <= 1e-2 * scale + 1e-2 * reference.abs()).all())
        if not _blockwise_trusted[b_blocks]:
            warnings.warn(
                "blockwise torch._scaled_mm disagreed with the per-tile FP8 GEMM; using the per-tile one", stacklevel=3
            )
            return reference
    return out


def _tiled_scaled_mm(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    (m, k), n = qa.shape, qb.shape[0]
    # the scaled GEMM wants M and N multiples of 16 and K tiles of full width: pad with zeros (scale 1)
    pad_m, pad_n, pad_k = -m % 16, -n % 16, -k % TILE
    if pad_k or pad_m:
        qa = F.pad(qa.view(torch.uint8), (0, pad_k, 0, pad_m)).view(qa.dtype)
        sa = F.pad(sa, (0, 0, 0, pad_m), value=1.0)
    if pad_k or pad_n:
        qb = F.pad(qb.view(torch.uint8), (0, pad_k, 0, pad_n)).view(qb.dtype)
        sb = F.pad(sb, (0, 0, 0, pad_n), value=1.0)
    out = torch.zeros(m + pad_m, n + pad_n, dtype=torch.float32, device=qa.device)
    for tile in range(sa.shape[1]):
        cols = slice(tile * TILE, (tile + 1) * TILE)
        out += torch._scaled_mm(
            qa[:, cols],
            qb[:, cols].t(),
            scale_a=sa[:, tile : tile + 1].contiguous(),
            scale_b=sb[:, tile].reshape(1, -1).contiguous(),
            out_dtype=torch.float32,
        )
    return out[:m, :n]
