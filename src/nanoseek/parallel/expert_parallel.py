"""Expert parallelism: each rank of the expert-parallel group owns E/ep consecutive routed experts.

The router and the sort by expert stay the model's own; this module replaces only the expert computation:

    tokens sorted by expert ──all_to_all (uneven splits)──▶ the ranks owning those experts
    regroup by local expert ─▶ the same grouped GEMM ─▶ back to arrival order ──all_to_all──▶ home, same order

Both all-to-alls are the autograd versions, so gradients flow back along the same routes. Expert weights become
DTensors sharded on dim 0 over the EP mesh, so full state dicts and DCP checkpoints see the global [E, ...] shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from nanoseek.models.common.eager import eager
from nanoseek.models.common.moe import RoutedExperts, expert_ffn
from nanoseek.models.deepseek_v3.model import DeepseekV3Model


class ExpertParallelExperts(nn.Module):
    def __init__(self, experts: RoutedExperts, mesh: DeviceMesh):
        super().__init__()
        self.group, self.ep = mesh.get_group(), mesh.size()
        if experts.n_experts % self.ep:
            raise ValueError(f"{experts.n_experts} experts do not split over {self.ep} expert-parallel ranks")
        self.n_experts, self.local = experts.n_experts, experts.n_experts // self.ep
        self.hidden_dim, self.gemm, self.limit = experts.hidden_dim, experts.gemm, experts.limit
        self.sent_bytes = 0  # activations this rank sent to other ranks by dispatch + combine (forward only)
        self.gate_up = nn.Parameter(distribute_tensor(experts.gate_up.data, mesh, [Shard(0)]))
        self.down = nn.Parameter(distribute_tensor(experts.down.data, mesh, [Shard(0)]))

    @eager  # inside compiled blocks: the all-to-all needs its split sizes on the host
    def forward(self, x: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        """x [N, dim] sorted by global expert id; group_ends [E] cumulative counts → [N, dim], same order."""
        counts = torch.diff(group_ends.long(), prepend=group_ends.new_zeros(1).long())  # tokens per global expert
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # [source rank, local expert] counts
        received = received.view(self.ep, self.local)
        # the one host transfer of the layer: the all-to-all's split sizes (both directions at once)
        send_splits, recv_splits = torch.stack(
            [counts.view(self.ep, self.local).sum(dim=1), received.sum(dim=1)]
        ).tolist()
        arrived = dist_fn.all_to_all_single(
            x.new_empty(sum(recv_splits), x.shape[1]), x.contiguous(), recv_splits, send_splits, group=self.group
        )
        # arrived is ordered (source, local expert); the grouped GEMM wants (local expert, source)
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.local, device=x.device).repeat(self.ep), received.flatten(), output_size=sum(recv_splits)
        )
        order = expert_of_row.argsort(stable=True)
        local_ends = received.sum(dim=0).cumsum(0).to(torch.int32)
        gate_up, down = self.gate_up.to_local(), self.down.to_local()
        out = expert_ffn(arrived[order], gate_up, down, local_ends, self.gemm, self.limit)
        unordered = torch.empty_like(out)
        unordered[order] = out
        me = dist.get_rank(self.group)
        row_bytes = x.shape[1] * x.element_size()
        self.sent_bytes += (sum(send_splits) - send_splits[me] + sum(recv_splits) - recv_splits[me]) * row_bytes
        return dist_fn.all_to_all_single(x.new_empty(x.shape), unordered, send_splits, recv_splits, group=self.group)


def take_sent_bytes(model: DeepseekV3Model) -> int:
    """The activation bytes this rank's expert-parallel layers sent to other ranks (dispatch + combine, forward
    only) since the last call; their counters start again from zero."""
    layers = [moe.experts for moe in model.moe_layers() if isinstance(moe.experts, ExpertParallelExperts)]
    sent = sum(layer.sent_bytes for layer in layers)
    for layer in layers:
        layer.sent_bytes = 0
    return sent


def apply_expert_parallel(model: DeepseekV3Model, mesh: DeviceMesh) -> None:
    """Swaps every MoE layer's experts for their expert-parallel shard (meta tensors stay meta)."""
    for moe in model.moe_layers():
        moe.experts = ExpertParallelExperts(moe.experts, mesh)
