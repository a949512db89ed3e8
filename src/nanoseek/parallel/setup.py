"""Distributed set-up from torchrun's environment, and the parallelism applied to a built (single-device) model:
FSDP2 over the data-parallel ranks, expert parallelism over the same ranks (DeepSeek's EP lives inside DP)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from nanoseek.errors import ConfigError
from nanoseek.model.transformer import Transformer
from nanoseek.parallel.expert_parallel import apply_expert_parallel


@dataclass(frozen=True)
class Parallelism:
    dp: int = 1  # data-parallel ranks (FSDP2 shards parameters, gradients and optimizer state over them)
    ep: int = 1  # expert-parallel ranks, a divisor of dp: routed experts split over them
    pp: int = 1  # pipeline stages' ranks
    pp_schedule: str = "1f1b"
    rank: int = 0
    device: torch.device = torch.device("cpu")
    dp_mesh: DeviceMesh | None = None
    ep_mesh: DeviceMesh | None = None
    replicate_group: dist.ProcessGroup | None = None  # ranks holding the same experts, when dp > ep

    @property
    def distributed(self) -> bool:
        return self.dp * self.pp > 1

    @property
    def dp_rank(self) -> int:
        """Which share of the global batch this rank trains on (pipeline ranks share one)."""
        return self.rank if self.pp == 1 else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_parallelism(dp: int | None, ep: int, pp: int = 1, pp_schedule: str = "1f1b",
                     timeout_s: float = 120) -> Parallelism:
    """Reads torchrun's WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on CUDA. A lost peer surfaces as an error
    on the others within timeout_s instead of a hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if pp < 1 or world % pp:
        raise ConfigError(f"--pp {pp} must divide the number of processes ({world})")
    dp = dp or world // pp
    if dp * pp != world:
        raise ConfigError(f"--dp {dp} x --pp {pp} must equal the number of processes ({world})")
    if pp > 1 and dp > 1:
        raise ConfigError("pipeline parallelism combined with data parallelism is not supported yet: use --pp "
                          "alone, or --dp/--ep alone")
    if ep < 1 or dp % ep:
        raise ConfigError(f"--ep {ep} must divide --dp {dp}")
    if world == 1:
        return Parallelism(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if pp > 1:
        return Parallelism(pp=pp, pp_schedule=pp_schedule, rank=dist.get_rank(), device=device)
    mesh = init_device_mesh(device.type, (dp // ep, ep), mesh_dim_names=("dp_replicate", "ep"))
    dp_mesh = init_device_mesh(device.type, (dp,), mesh_dim_names=("dp",))
    return Parallelism(dp, ep, rank=dist.get_rank(), device=device, dp_mesh=dp_mesh,
                       ep_mesh=mesh["ep"] if ep > 1 else None,
                       replicate_group=mesh["dp_replicate"].get_group() if ep > 1 and dp > ep else None)


def parallelize(model: Transformer, par: Parallelism) -> list[torch.nn.Parameter]:
    """Applies EP then FSDP2 (per block, then the root) in place; returns the expert-parallel parameters, whose
    gradients the trainer averages itself (FSDP leaves them alone)."""
    if par.dp == 1:
        return []
    expert_params = apply_expert_parallel(model, par.ep_mesh) if par.ep_mesh is not None else []
    ignored = set(expert_params)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if par.device.type == "cuda" else MixedPrecisionPolicy()
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        fully_shard(block, mesh=par.dp_mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=par.dp_mesh, mp_policy=policy, ignored_params=ignored)
    return expert_params
