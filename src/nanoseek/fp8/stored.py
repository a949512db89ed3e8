"""Weights kept as DeepSeek released them (E4M3 with 128×128 block scales, FP4 with a scale per 32 values) and
dequantized a tile of rows at a time inside the GEMM, never held whole in a wider dtype.

    QuantizedLinear    nn.Linear's place: out = x · dequantize(W)ᵀ, 128 rows of W at a time
    QuantizedExperts   RoutedExperts' place: each expert that received tokens is dequantized for its rows only

Dequantization is exact in fp32 (every stored value times a scale is an fp32 number), so a model holding these
gives the logits of the model holding the dequantized weights in fp32, and of transformers' `dequantize=True` in
bf16 up to its rounding. The activations stay in the model's dtype: this is weight-only storage, the arithmetic of
the dequantized model, on CPUs and GPUs alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.fp8.fp4 import dequantize_fp4
from nanoseek.fp8.quant import TILE, dequantize_blocks
from nanoseek.models.common.layers import KeepsDtype, swiglu

ROWS_PER_TILE = 8 * TILE  # rows of a weight dequantized at once: a few MB of fp32 at DeepSeek's widths


class StoredWeight(KeepsDtype, nn.Module):
    """values [..., R, K] E4M3 (`encoding` "fp8", scale [..., R/128, K/128]) or int8 [..., R, K/2] ("fp4", scale
    [..., R, K/32]); the scale fp32 or ue8m0. No cast changes either."""

    kept_dtype = ("values", "scale")

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, encoding: str):
        super().__init__()
        if encoding not in ("fp8", "fp4"):
            raise ValueError(f"unknown weight encoding {encoding!r} (fp8 or fp4)")
        self.encoding = encoding
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)

    @property
    def shape(self) -> torch.Size:
        """The dequantized weight's shape."""
        *lead, k = self.values.shape
        return torch.Size((*lead, 2 * k if self.encoding == "fp4" else k))

    def rows(self, start: int, end: int, expert: int | None = None) -> torch.Tensor:
        """Rows [start, end) of the weight (of `expert`, for stacked experts) in fp32; start a multiple of 128."""
        values = self.values if expert is None else self.values[expert]
        scale = self.scale if expert is None else self.scale[expert]
        if self.encoding == "fp4":
            return dequantize_fp4(values[start:end], scale[start:end])
        return dequantize_blocks(values[start:end], scale[start // TILE : -(-end // TILE)])

    def dequantize(self, dtype: torch.dtype = torch.float32, expert: int | None = None) -> torch.Tensor:
        rows = self.shape[-2]
        return torch.cat(
            [self.rows(r, min(r + ROWS_PER_TILE, rows), expert) for r in range(0, rows, ROWS_PER_TILE)]
        ).to(dtype)


def matmul_stored(x: torch.Tensor, weight: StoredWeight, expert: int | None = None) -> torch.Tensor:
    """x [..., K] · Wᵀ → [..., R] in x's dtype, W dequantized ROWS_PER_TILE rows at a time."""
    rows = weight.shape[-2]
    if rows <= ROWS_PER_TILE:
        return F.linear(x, weight.rows(0, rows, expert).to(x.dtype))
    return torch.cat(
        [
            F.linear(x, weight.rows(r, min(r + ROWS_PER_TILE, rows), expert).to(x.dtype))
            for r in range(0, rows, ROWS_PER_TILE)
        ],
        dim=-1,
    )


class QuantizedLinear(nn.Module):
    """A bias-free nn.Linear whose weight stays as released."""

    def __init__(self, weight: StoredWeight):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_stored(x, self.weight)


class QuantizedExperts(nn.Module):
    """RoutedExperts with gate_up [E, 2·I, dim] and down [E, dim, I] stored as released. Experts without tokens
    are never dequantized; the others one at a time, over their own rows."""

    def __init__(self, gate_up: StoredWeight, down: StoredWeight, limit: float):
        super().__init__()
        self.gate_up, self.down, self.limit = gate_up, down, limit
        self.n_experts, self.hidden_dim = gate_up.shape[0], down.shape[-1]

    def forward(self, x: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        """x [N, dim], rows sorted by expert; group_ends [E] int32 cumulative row counts → [N, dim]."""
        out = torch.empty_like(x)
        ends = group_ends.tolist()  # one host read a layer: the experts to dequantize
        for expert, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
            if end > start:
                gate, up = matmul_stored(x[start:end], self.gate_up, expert).chunk(2, dim=-1)
                out[start:end] = matmul_stored(swiglu(gate, up, self.limit), self.down, expert)
        return out


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take, each tensor counted once (a tied head is the embedding)."""
    seen: dict[tuple[int, torch.device], int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.device) if not tensor.is_meta else (id(tensor), tensor.device)
        seen[key] = max(seen.get(key, 0), tensor.numel() * tensor.element_size())
    return sum(seen.values())


def dequantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each stored weight dequantized (fp32) under the name the plain module gives it:
    what saving a model loaded quantized writes."""
    state = {}
    stored = {f"{name}.": module for name, module in model.named_modules() if isinstance(module, StoredWeight)}
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0] + "."
        if owner in stored:
            if key.endswith(".values"):
                state[key.removesuffix(".values")] = stored[owner].dequantize()
        else:
            state[key] = tensor
    return state
