"""Rotary position embedding with YaRN context extension, for MLA's decoupled RoPE dimensions (or GQA heads)."""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import ModelConfig, yarn_mscale
from nanoseek.models.common.layers import KeepsDtype


def rope_inverse_frequencies(config: ModelConfig, kind: str = "main") -> tuple[torch.Tensor, float]:
    """Per-pair rotation speeds [rope_dim/2] and the factor YaRN applies to cos/sin.

    YaRN keeps the high-frequency pairs (many rotations within the original context) as they are, interpolates the
    low-frequency ones by `factor`, and ramps linearly between the two correction dimensions.

    DeepSeek-V4 has two kinds of layers, each with its own base and scaling (DeepseekV4Config.rope_parameters).
    """
    base, yarn, scale_cos_sin = config.rope_parameters(kind)
    dim = config.rope_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (unchanged), 0: interpolate
    inv_freq = inv_freq / yarn.factor * (1 - keep) + inv_freq * keep
    if not scale_cos_sin:
        return inv_freq, 1.0
    # mscale/mscale_all_dim both given (as DeepSeek does): their ratio, 1 for V3; the attention temperature itself
    # goes into the softmax scale (ModelConfig.softmax_scale).
    if yarn.mscale and yarn.mscale_all_dim:
        cos_sin_scale = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:
        cos_sin_scale = yarn_mscale(yarn.factor)
    return inv_freq, cos_sin_scale


class RotaryEmbedding(KeepsDtype, nn.Module):
    kept_dtype = ("inv_freq",)  # bf16 frequencies would misplace every position past a few hundred

    def __init__(self, config: ModelConfig, kind: str = "main"):
        super().__init__()
        self.config, self.kind = config, kind
        self.register_buffer("inv_freq", torch.empty(config.rope_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Recomputes the (non-persistent) frequencies, e.g. after a model was built on the meta device."""
        inv_freq, self.cos_sin_scale = rope_inverse_frequencies(self.config, self.kind)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq.to(self.inv_freq.device))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] → cos, sin [..., T, rope_dim/2] in fp32."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        return angles.cos() * self.cos_sin_scale, angles.sin() * self.cos_sin_scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x0, x1), (x2, x3), ... of x [B, H, T, D] as DeepSeek's weights expect.

    The result is laid out [rotated evens; rotated odds] rather than re-interleaved: RoPE dims only ever meet in
    q·k dot products, which a permutation shared by q and k leaves unchanged, and this saves an interleaving copy.
    cos, sin: [T, D/2] or [B, T, D/2].
    """
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.to(x.dtype)


def apply_rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x_i, x_{i+D/2}) of x [B, H, T, D]: the layout of V3.2's lightning indexer (transformers and
    DeepSeek's fixed reference), where MLA's own RoPE dims are interleaved. Same frequencies as apply_rope."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


def apply_rope_trailing(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4's RoPE: rotates interleaved pairs of the last 2·cos.shape[-1] dims of x [B, H, T, D] and keeps
    their order (V4's values carry the rotation too, and its output projection reads them in place). cos, sin:
    [T, r/2] or [B, T, r/2]; rotating by -sin undoes it."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rope_dim = 2 * cos.shape[-1]
    rest, rope = x.split([x.shape[-1] - rope_dim, rope_dim], dim=-1)
    even, odd = rope[..., 0::2].float(), rope[..., 1::2].float()
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([rest, rotated.to(x.dtype)], dim=-1)
