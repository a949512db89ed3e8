"""The small shared pieces: RMSNorm and the SwiGLU MLP (dense layers and shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear_compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """nn.Linear's autocast rule, for GEMMs autocast does not know (grouped GEMM, the chunked head): the autocast
    dtype when autocast is on, else the weight's dtype (which FSDP's mixed-precision policy may already have cast)."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def dense(weight: torch.Tensor | nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a tensor: itself, or one kept as released (fp8/stored.py: anything with `dequantize`) dequantized
    into `dtype`, for the few places that read a weight rather than call its linear (MLA's absorbed decode)."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)


class KeepsDtype:
    """Mixin for modules whose tensors named in `kept_dtype` (buffers or parameters) keep their dtype through every
    cast (`model.to(bf16)`, `.half()`, `load_pretrained(dtype=...)`): a cast moves them to the new device only.
    Casting to bf16 and back would not do: the values are rounded on the way (8 distinct routing biases became 2).
    What DeepSeek keeps in fp32 (routing biases, V4's hyper-connections, sinks, position biases) and the weights
    kept as released (E4M3, FP4) are held this way."""

    kept_dtype: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name).data for name in self.kept_dtype}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            tensor = getattr(self, name)
            moved = torch.empty_like(old, device=tensor.device) if old.is_meta else old.to(tensor.device)
            if isinstance(tensor, nn.Parameter):
                tensor.data = moved
            else:
                setattr(self, name, moved)
        return self


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the activation dtype, as the reference does.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(gate) · up; with a limit (DeepSeek-V4's swiglu_limit), gate clamped to <= limit and up to ±limit first."""
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one GEMM."""

    def __init__(self, dim: int, hidden_dim: int, limit: float = 0.0):
        super().__init__()
        self.hidden_dim, self.limit = hidden_dim, limit
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=False)  # rows: [gate; up]
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(swiglu(gate, up, self.limit))
