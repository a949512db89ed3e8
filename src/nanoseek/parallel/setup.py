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

from nanoseek.errors import ConfigError, NanoseekError, first_line
from nanoseek.models.common.moe import HashRouter, Router
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.deepseek_v4.compressor import CompressedIndexer, Compressor
from nanoseek.models.deepseek_v4.hyper import HyperConnection, HyperHead
from nanoseek.models.deepseek_v32.indexer import LightningIndexer
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
    expert_dp_mesh: DeviceMesh | None = None  # ranks holding the same experts (dp / ep of them): FSDP's for experts
    pp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None
    checkpoint_group: dist.ProcessGroup | None = None  # gloo, with a timeout for checkpoints (DCP and their waits)
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

    @property
    def world(self) -> int:
        """Devices the run uses: what MFU divides by."""
        return self.dp * self.pp


def init_parallelism(
    dp: int | None,
    ep: int,
    pp: int = 1,
    pp_schedule: str = "1f1b",
    timeout_s: float = 120,
    checkpoint_timeout_s: float = 1800,
) -> Parallelism:
    """Reads torchrun's WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU; on CUDA, NCCL for CUDA tensors plus gloo for any
    CPU tensor a library collective brings (object broadcasts). A lost peer surfaces as an error on the others
    within timeout_s (NCCL's and gloo's collectives alike) instead of a hang; checkpoints run over a gloo group of
    their own whose timeout, checkpoint_timeout_s, allows a slow filesystem."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if pp < 1 or world % pp:
        raise ConfigError(f"--pp {pp} must divide the number of processes ({world})")
    dp = dp or world // pp
    if dp * pp != world:
        raise ConfigError(f"--dp {dp} x --pp {pp} must equal the number of processes ({world})")
    if pp > 1 and dp > 1 and pp_schedule in ("zbv", "dualpipev"):
        # with their split input-/weight-gradient backward, FSDP's gradient reduction does not give the
        # one-process gradients (DP2 x PP2, 4 layers: gradient norms 3 % off with zbv, 0.3 % with dualpipev):
        # refused rather than trained subtly wrong
        raise ConfigError(
            f"--pp-schedule {pp_schedule} with --dp > 1 is not supported yet; use gpipe, 1f1b or "
            "interleaved1f1b, or --pp alone"
        )
    if ep < 1 or dp % ep:
        raise ConfigError(f"--ep {ep} must divide --dp {dp}")
    if world == 1:
        return Parallelism(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    checkpoint_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=checkpoint_timeout_s))
    # One root mesh (pp, dp_replicate, ep): pipeline stages along "pp"; within a stage, FSDP over all dp ranks
    # (dp_replicate x ep, flattened) and the experts sharded over "ep", then FSDP-sharded over "dp_replicate" (the
    # ranks holding the same experts). Sub-meshes of one root let FSDP shard those DTensors further (its 2-D path).
    mesh = init_device_mesh(device.type, (pp, dp // ep, ep), mesh_dim_names=("pp", "dp_replicate", "ep"))
    return Parallelism(
        dp,
        ep,
        pp,
        pp_schedule,
        dist.get_rank(),
        device,
        dp_mesh=mesh["dp_replicate", "ep"]._flatten("dp"),
        ep_mesh=mesh["ep"] if ep > 1 else None,
        expert_dp_mesh=mesh["dp_replicate"] if ep > 1 else None,
        pp_rank=mesh.get_local_rank("pp"),
        pp_group=mesh["pp"].get_group() if pp > 1 else None,
        checkpoint_group=checkpoint_group,
    )


def explain_failure(error: BaseException, par: Parallelism, timeout_s: float) -> NanoseekError | None:
    """One line naming what stopped a run, for the failures a user can act on: memory, and a collective whose
    peer died or stalled (gloo and NCCL report those from inside whatever collective was running). None for
    anything else, which keeps its traceback."""
    text = str(error)
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text:
        return NanoseekError(
            f"rank {par.rank}: out of memory on {par.device}: {first_line(error)} (try a smaller "
            "train.batch_size with a larger train.grad_accum, train.recompute=true, or more "
            "processes)"
        )
    peer_trouble = ("gloo", "nccl", "connection", "timed out", "timeout", "peer")
    if par.distributed and (isinstance(error, dist.DistError) or any(w in text.lower() for w in peer_trouble)):
        return NanoseekError(
            f"rank {par.rank}: a collective with the other processes failed (did one die, or wait "
            f"past train.collective_timeout_s={timeout_s:g}?): {type(error).__name__}: "
            f"{first_line(error)}"
        )
    return None


def parallelize(model: DeepseekV3Model, par: Parallelism) -> None:
    """Applies EP, then FSDP2 in place: the expert-parallel experts of each MoE layer as their own unit over the
    ranks that hold the same experts, then each block and the root over all data-parallel ranks. Every parameter
    is thus cast by the same mixed-precision policy, its gradient reduced by FSDP, and every gradient element
    held by exactly one rank (so squared norms add up over the world). Works on a model still on the meta device."""
    if par.dp == 1 or par.pp > 1:  # pipelines shard each stage (PipelineRunner)
        return
    shard_experts(model, par)
    shard_blocks([*model.layers, *(m.block for m in model.mtp)], model, par)


def shard_experts(model: DeepseekV3Model, par: Parallelism) -> None:
    """With --ep: each MoE layer's experts become their expert-parallel shard, and FSDP2 units of their own over
    the ranks that hold the same experts (the whole model, or what a pipeline rank kept of it)."""
    if par.ep_mesh is None:
        return
    apply_expert_parallel(model, par.ep_mesh)
    for moe in model.moe_layers():
        fully_shard(moe.experts, mesh=par.expert_dp_mesh, mp_policy=mixed_precision(par))
        # An expert's gradient already sums every token its EP group routed to it, each rank's loss being a mean
        # over its own tokens; the global loss is the mean over all dp ranks: sum over replicas, divide by dp.
        moe.experts.set_gradient_divide_factor(par.dp)
        if par.expert_dp_mesh.size() > 1:
            # sum, then divide: gloo has no pre-scaled sum. (Not for one replica: torch 2.13 then divides twice.)
            moe.experts.set_force_sum_reduction_for_comms(True)


def shard_blocks(blocks: list[torch.nn.Module], root: torch.nn.Module, par: Parallelism) -> None:
    """FSDP2 over all data-parallel ranks: each block, then the root (the model, or a pipeline stage). Units of
    their own inside a block: the modules whose parameters FSDP must not cast, with an fp32 policy (as one process
    under autocast keeps them): each MoE router (routing runs in fp32 by design: bf16 scores tie, and ties pick
    experts arbitrarily), and V4's hyper-connections (the residual mix itself) and compressors (their position
    biases enter an fp32 softmax; transformers keeps them fp32); and each indexer (in V3.2's dense warm-up its KL is
    the only loss, a graph that never passes through its block's output, where FSDP would have gathered the
    block's parameters again for backward). V4's attention sinks are cast with their block."""
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for block in blocks:
        for module in [m for m in block.modules() if isinstance(m, (Router, HashRouter, HyperConnection, Compressor))]:
            fully_shard(module, mesh=par.dp_mesh, mp_policy=fp32)
        for indexer in [m for m in block.modules() if isinstance(m, (LightningIndexer, CompressedIndexer))]:
            fully_shard(indexer, mesh=par.dp_mesh, mp_policy=mixed_precision(par))
        fully_shard(block, mesh=par.dp_mesh, mp_policy=mixed_precision(par))
    for head in [m for m in root.children() if isinstance(m, HyperHead)]:
        fully_shard(head, mesh=par.dp_mesh, mp_policy=fp32)
    fully_shard(root, mesh=par.dp_mesh, mp_policy=mixed_precision(par))


def mixed_precision(par: Parallelism) -> MixedPrecisionPolicy:
    """Parameters cast to the compute dtype for forward/backward, gradients reduced in fp32."""
    if par.compute_dtype != torch.float32:
        return MixedPrecisionPolicy(param_dtype=par.compute_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()
