"""Fine-grained E4M3 quantization (DeepSeek-V3 §3.3.2), the scales taken online from the current max-abs.

    activations      1×128 tiles: per token, per 128 channels         quantize_tiles(x)
    activation grads 128×1 tiles: per channel, per 128 tokens         quantize_tiles(x.t())  (tiles run along K)
    weights          128×128 blocks                                   quantize_blocks(w)

A value is stored as q = x / scale in E4M3 and read back as q · scale: `scale` is what DeepSeek's checkpoints call
`weight_scale_inv`. Tiles and blocks at a ragged edge are zero-padded before their max is taken. With `pow2` the
scales are rounded up to powers of two, so multiplying by them is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TILE = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def _scale_for(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = amax.float() / E4M3_MAX
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return torch.where(amax > 0, scale, torch.ones_like(scale))  # an all-zero tile keeps scale 1


def _to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(E4M3).float()  # every E4M3 value, by bit pattern


def e4m3_to_float(q: torch.Tensor) -> torch.Tensor:
    """E4M3 → fp32. On CPUs a lookup of the 256 possible values is ~2x faster than the element-wise cast."""
    if q.device.type != "cpu":
        return q.float()
    return _E4M3_VALUES.index_select(0, q.reshape(-1).view(torch.uint8).int()).view(q.shape)


def _pad_to_tiles(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Zero-pads the last `dims` dimensions to multiples of 128 (no copy when they already are)."""
    pads = [p for size in reversed(x.shape[-dims:]) for p in (0, -size % TILE)]
    return F.pad(x, pads) if any(pads) else x


def quantize_tiles(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] → (E4M3 [R, K], scale fp32 [R, ceil(K/128)]): one scale per row and 128 consecutive columns."""
    rows, k = x.shape
    n_tiles = -(-k // TILE)  # spelled out, not -1: an expert-parallel rank may receive no rows at all
    tiles = _pad_to_tiles(x.float(), 1).view(rows, n_tiles, TILE)
    scale = _scale_for(tiles.abs().amax(dim=-1, keepdim=True), pow2)
    return _to_e4m3(tiles, scale).view(rows, n_tiles * TILE)[:, :k].contiguous(), scale.squeeze(-1)


def quantize_grouped_tiles(
    x: torch.Tensor, group_ends: torch.Tensor, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_tiles for columns that fall into groups (the tokens of each expert, for its weight gradient): tiles
    restart at each group's first column, so no tile mixes two experts. x [R, K]; group_ends [G] cumulative.

    Returns (E4M3 [R, K], scale fp32 [R, K]): the scale is given per column, since tiles no longer sit on a grid."""
    rows, k = x.shape
    ends = group_ends.long()
    group_of = torch.searchsorted(ends, torch.arange(k, device=x.device), right=True)  # [K]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    in_group = torch.arange(k, device=x.device) - starts[group_of]
    tiles_before = torch.cat([ends.new_zeros(1), (-(-(ends - starts) // TILE)).cumsum(0)[:-1]])
    tile_of = tiles_before[group_of] + in_group // TILE  # [K] global tile index
    n_tiles = len(ends) + -(-k // TILE)  # an upper bound (each group adds at most one partial tile): no host read
    amax = x.new_zeros(rows, n_tiles, dtype=torch.float32).scatter_reduce_(
        1, tile_of.expand(rows, k), x.float().abs(), "amax"
    )
    scale = _scale_for(amax, pow2)[:, tile_of]
    return _to_e4m3(x, scale), scale


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[..., R, C] → zero-padded [..., R/128, 128, C/128, 128] view of blocks."""
    padded = _pad_to_tiles(x, 2)
    *lead, rows, cols = padded.shape
    return padded.view(*lead, rows // TILE, TILE, cols // TILE, TILE)


def quantize_blocks(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] → (E4M3 [..., R, C], scale fp32 [..., ceil(R/128), ceil(C/128)]); stacked experts [E, R, C]
    get blocks per expert."""
    *lead, rows, cols = w.shape
    blocks = _blocks(w.float())
    scale = _scale_for(blocks.abs().amax(dim=(-3, -1), keepdim=True), pow2)
    padded = _to_e4m3(blocks, scale).view(*lead, blocks.shape[-4] * TILE, blocks.shape[-2] * TILE)
    return padded[..., :rows, :cols].contiguous(), scale.squeeze(-1).squeeze(-2)


def expand_block_scales(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales [..., R/128, C/128] → one scale per element [..., R, C]."""
    return scale.repeat_interleave(TILE, -2).repeat_interleave(TILE, -1)[..., :rows, :cols]


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of quantize_blocks, in fp32."""
    *lead, rows, cols = q.shape
    expected = (*lead, -(-rows // TILE), -(-cols // TILE))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale.shape)}, expected {expected} for a "
            f"{rows}x{cols} weight in {TILE}x{TILE} blocks"
        )
    return e4m3_to_float(q) * expand_block_scales(scale.float(), rows, cols)


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of quantize_tiles (per-tile scales [R, K/128]) or of quantize_grouped_tiles (per-column [R, K])."""
    if scale.shape[-1] != q.shape[-1]:
        scale = scale.repeat_interleave(TILE, -1)[..., : q.shape[-1]]
    return e4m3_to_float(q) * scale
