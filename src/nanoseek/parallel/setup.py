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
    pp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None
    compute_dtype: torch.dtype = torch.float32  # parameters' dtype in forward/backward (FSDP2 casts them)

    @property
    def distributed(self) -> bool:
        return self.dp * self.pp > 1

    @property
    def dp_rank(self) -> int:
        """Which share of the global batch this rank trains on (the ranks of one pipeline share one)."""
        return self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.dp_mesh.get_group() if self.dp_mesh is not None else None

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
    if pp > 1 and ep > 1:
        raise ConfigError("pipeline parallelism combined with expert parallelism is not supported yet: use "
                          "--pp with --dp, or --dp with --ep")
    if pp > 1 and dp > 1 and pp_schedule in ("zbv", "dualpipev"):
        # their split input-/weight-gradient backward and FSDP's gradient reduction measured 3e-4 apart from the
        # single-process gradients: refused rather than trained subtly wrong
        raise ConfigError(f"--pp-schedule {pp_schedule} with --dp > 1 is not supported yet; use gpipe, 1f1b or "
                          "interleaved1f1b, or --pp alone")
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
    if pp > 1:  # FSDP over the data-parallel ranks of each stage; stages talk over the pipeline dimension
        mesh = init_device_mesh(device.type, (pp, dp), mesh_dim_names=("pp", "dp"))
        return Parallelism(dp, 1, pp, pp_schedule, dist.get_rank(), device, dp_mesh=mesh["dp"],
                           pp_rank=mesh.get_local_rank("pp"), pp_group=mesh["pp"].get_group())
    mesh = init_device_mesh(device.type, (dp // ep, ep), mesh_dim_names=("dp_replicate", "ep"))
    dp_mesh = init_device_mesh(device.type, (dp,), mesh_dim_names=("dp",))
    return Parallelism(dp, ep, rank=dist.get_rank(), device=device, dp_mesh=dp_mesh,
                       ep_mesh=mesh["ep"] if ep > 1 else None,
                       replicate_group=mesh["dp_replicate"].get_group() if ep > 1 and dp > ep else None)


def parallelize(model: Transformer, par: Parallelism) -> list[torch.nn.Parameter]:
    """Applies EP then FSDP2 (per block, then the root) in place; returns the expert-parallel parameters, whose
    gradients the trainer averages itself (FSDP leaves them alone)."""
    if par.dp == 1 or par.pp > 1:  # pipelines apply FSDP per stage (PipelineRunner)
        return []
    expert_params = apply_expert_parallel(model, par.ep_mesh) if par.ep_mesh is not None else []
    ignored = set(expert_params)
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        fully_shard(block, mesh=par.dp_mesh, mp_policy=mixed_precision(par), ignored_params=ignored)
    fully_shard(model, mesh=par.dp_mesh, mp_policy=mixed_precision(par), ignored_params=ignored)
    return expert_params


def mixed_precision(par: Parallelism) -> MixedPrecisionPolicy:
    """Parameters cast to the compute dtype for forward/backward, gradients reduced in fp32."""
    if par.compute_dtype != torch.float32:
        return MixedPrecisionPolicy(param_dtype=par.compute_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()
