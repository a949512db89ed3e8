"""Routed experts: the sorted-token grouped GEMM equals a naive loop over experts, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from nanoseek.models.common.moe import MoE


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: the textbook definition."""
    flat = x.reshape(-1, x.shape[-1])
    weights, ids, _ = moe.router(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(ids.shape[1]):
            e = ids[t, slot]
            gate, up = (moe.experts.gate_up[e] @ flat[t]).chunk(2)
            out[t] += weights[t, slot] * (moe.experts.down[e] @ (F.silu(gate) * up))
    if moe.shared is not None:
        out = out + moe.shared(flat)
    return out.view_as(x)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(),
        dict(hidden_size=30, moe_intermediate_size=14),
        dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2),
    ],
)
def test_grouped_gemm_equals_loop(sizes):
    torch.manual_seed(0)
    config = tiny_config(**sizes)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 7, config.hidden_size, requires_grad=True)
    y = moe(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *moe.parameters()])
    y_ref = naive_moe(moe, x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *moe.parameters()])
    assert (y - y_ref).abs().max() < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() < 1e-4 * max(1.0, g_ref.abs().max().item())


def test_expert_load_counts_routed_tokens():
    torch.manual_seed(0)
    config = tiny_config()
    moe = MoE(config)
    torch.nn.init.normal_(moe.router.weight)
    x = torch.randn(2, 5, config.hidden_size)
    moe(x)
    _, ids, _ = moe.router(x.view(-1, config.hidden_size))
    assert moe.expert_load.sum().item() == 10 * config.num_experts_per_tok
    assert torch.equal(moe.expert_load, torch.bincount(ids.flatten(), minlength=8).float())


def test_bias_steers_selection_not_weights():
    torch.manual_seed(0)
    moe = MoE(tiny_config(n_group=1, topk_group=1))
    torch.nn.init.normal_(moe.router.weight)
    x = torch.randn(4, moe.router.weight.shape[1])
    moe.router.expert_bias[3] = 10.0  # expert 3 always selected ...
    weights, ids, scores = moe.router(x)
    assert (ids == 3).any(dim=1).all()
    # ... but its gate value is its unbiased score, normalized over the chosen experts and scaled
    picked = scores.gather(1, ids)
    expected = picked / picked.sum(dim=1, keepdim=True) * 2.5
    assert torch.allclose(weights, expected)


def test_group_limited_routing_stays_in_top_groups():
    torch.manual_seed(0)
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    moe = MoE(config)
    torch.nn.init.normal_(moe.router.weight)
    _, ids, _ = moe.router(torch.randn(64, config.hidden_size))
    groups_used = [len(set((row // 4).tolist())) for row in ids]
    assert max(groups_used) <= 2 and min(groups_used) >= 1


def test_group_limited_routing_bounds_expert_parallel_ranks():
    """Experts are sharded over EP ranks in contiguous blocks, and groups are contiguous blocks too: with n_group a
    multiple of ep, each group lives on one rank, so a token's experts sit on at most topk_group ranks."""
    torch.manual_seed(1)
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    moe = MoE(config)
    torch.nn.init.normal_(moe.router.weight)
    _, ids, _ = moe.router(torch.randn(256, config.hidden_size))
    for ep in (2, 4):
        ranks_per_token = [len(set((row // (16 // ep)).tolist())) for row in ids]
        assert max(ranks_per_token) <= config.topk_group
    assert max(len(set((row // 2).tolist())) for row in ids) > config.topk_group  # 8 ranks: groups split
