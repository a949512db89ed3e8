"""The few collective steps a data/expert-parallel training step needs beyond what FSDP2 does itself."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import build_model
from nanoseek.parallel.setup import Parallelism


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def mean_over_ranks(values: torch.Tensor, par: Parallelism) -> torch.Tensor:
    """Mean over the data-parallel ranks of a tensor on par.device (pipeline ranks report whole-batch values
    already)."""
    if par.dp == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, group=par.dp_group)
    return values / par.dp


def sum_over_ranks(tensors: list[torch.Tensor], par: Parallelism) -> list[torch.Tensor]:
    """Expert loads of the whole global batch (aux-loss-free balancing must see all of it)."""
    if par.dp == 1 or not tensors:
        return tensors
    stacked = torch.stack(tensors)
    dist.all_reduce(stacked, group=par.dp_group)
    return list(stacked.unbind(0))


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, par: Parallelism) -> torch.Tensor:
    """Global gradient-norm clipping over sharded (FSDP, EP) and plain parameters; → the norm before clipping, on
    the device (reading it would stall a GPU). Every gradient element lives on exactly one rank (FSDP shards the
    expert-parallel experts over their replicas too; pipeline stages own disjoint parameters), so squared norms
    add up over the world."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    squared = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    if par.distributed:
        dist.all_reduce(squared)
    norm = squared.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)
    return norm


def save_final_model(model: DeepseekV3Model, out: Path, par: Parallelism) -> None:
    """The HF-layout model file of a run: gathered from all shards (collective), written by rank 0."""
    if not par.distributed:
        save_pretrained(model, out)
        return
    if par.pp > 1:  # each rank holds its stages' tensors (FSDP-sharded when dp > 1): gather, then collect
        mine = {k: _full(v).detach().cpu() for k, v in model.state_dict().items()}
        parts: list[dict] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        full = {k: v for part in parts for k, v in part.items()}
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if par.is_main:
        plain = build_model(model.config)
        plain.load_state_dict(full)
        save_pretrained(plain, out)
    dist.barrier()
