"""Seeded initialization that does not depend on how a parameter is sharded.

A model built on the meta device, sharded (FSDP, expert parallelism, pipeline stages) and only then materialized
must get the same weights as the one-process model of the same seed, or no parallel run could be compared with a
single-process one. So values are a function of (seed, parameter name, global row): dim 0 is cut into blocks of
about a million elements, each drawn from its own generator, and every rank draws only the blocks that hold rows it
owns. FSDP and expert parallelism both shard dim 0, so which global rows a shard holds is found by sharding a
row-index vector the same way.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

BLOCK_ELEMENTS = 1 << 20


def _global_rows(param: torch.Tensor) -> torch.Tensor:
    """The global dim-0 indices of the rows this rank holds, in local order (all of them for a plain tensor)."""
    if not isinstance(param, DTensor):
        return torch.arange(param.shape[0])
    if any(p.is_shard() and p.dim != 0 for p in param.placements):
        raise ValueError(f"seeded init needs parameters sharded on dim 0, got placements {param.placements}")
    index = torch.arange(param.shape[0], device=param.device_mesh.device_type)
    return distribute_tensor(index, param.device_mesh, param.placements, src_data_rank=None).to_local().cpu()


def _block_seed(seed: int, name: str, block: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) * 65_537 + block & (2**63 - 1)


@torch.no_grad()
def seeded_normal_(param: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fills param (plain or DTensor) with N(0, std²) values determined by (seed, name) and each row's global index."""
    rows = _global_rows(param)
    row_shape = tuple(param.shape[1:])
    rows_per_block = max(1, BLOCK_ELEMENTS // max(1, math.prod(row_shape)))
    values = torch.empty((len(rows), *row_shape), dtype=torch.float32)
    blocks = rows // rows_per_block
    for block in blocks.unique().tolist():
        drawn = torch.randn(
            (rows_per_block, *row_shape), generator=torch.Generator().manual_seed(_block_seed(seed, name, block))
        )
        mine = (blocks == block).nonzero().flatten()
        values[mine] = drawn[rows[mine] - block * rows_per_block]
    local = param.to_local() if isinstance(param, DTensor) else param
    local.copy_(values.mul_(std).view(local.shape))
