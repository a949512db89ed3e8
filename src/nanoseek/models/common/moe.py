"""DeepSeekMoE (V3 §2.1.2): shared experts + many fine-grained routed experts, group-limited top-k routing.

Routed experts are stacked weights [E, out, in]. Tokens are sorted by expert and all experts run as one grouped GEMM
(no Python loop over experts), so expert parallelism can later shard dim 0 and feed the same kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.eager import eager
from nanoseek.models.common.layers import MLP, KeepsDtype, linear_compute_dtype, swiglu
from nanoseek.models.common.terms import ForwardTerms


def routing_scores(x: torch.Tensor, weight: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """x [N, dim] → expert scores [N, E] in fp32. Routing is precision-sensitive (bf16 scores tie, and ties pick
    experts arbitrarily), so it runs in fp32 even inside autocast, which would otherwise turn this linear into bf16."""
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.float(), weight.float())
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    if scoring_func == "sqrtsoftplus":  # DeepSeek-V4
        return F.softplus(logits).sqrt()
    return logits.softmax(dim=-1)


def gate_weights(scores: torch.Tensor, expert_ids: torch.Tensor, normalize: bool, scale: float) -> torch.Tensor:
    """The picked experts' scores [N, k], summing to 1 if `normalize`, times the routed scaling factor."""
    weights = scores.gather(1, expert_ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale


class Router(KeepsDtype, nn.Module):
    """Scores every expert, then picks top-k within the best `topk_group` groups.

    The correction bias (aux-loss-free balancing) shifts which experts are *selected* but never the gate values,
    so it steers load without entering the gradient. It accumulates γ-sized steps, so it stays fp32 whatever the
    model is cast to (DeepSeek's checkpoints and transformers keep it fp32 too).
    """

    kept_dtype = ("expert_bias",)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scoring_func, self.norm_topk_prob = config.scoring_func, config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, dim] → gate weights [N, k] (fp32), expert ids [N, k], scores [N, E] (fp32, unbiased)."""
        scores = routing_scores(x, self.weight, self.scoring_func)
        choice = scores + self.expert_bias
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            # V3 (sigmoid): a group's score is the sum of its two best experts; V2 (softmax): its best expert.
            if self.scoring_func == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            kept = group_scores.topk(self.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        expert_ids = choice.topk(self.top_k, dim=-1).indices
        return gate_weights(scores, expert_ids, self.norm_topk_prob, self.routed_scaling_factor), expert_ids, scores


class HashRouter(nn.Module):
    """DeepSeek-V4's hash routing (its first MoE layers): each token id goes to fixed experts, `tid2eid[token]`;
    the learned scores only weigh them. Nothing to balance, so no correction bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.scoring_func = config.num_experts_per_tok, config.scoring_func
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        self.n_experts = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.int64))

    @torch.no_grad()
    def reset_table(self, seed: int) -> None:
        """A fresh table for training from scratch: k distinct experts per token, drawn from `seed` alone (so every
        rank draws the same). DeepSeek hashes token ids; any fixed spread of the vocabulary does the same job."""
        draws = torch.rand(self.tid2eid.shape[0], self.n_experts, generator=torch.Generator().manual_seed(seed))
        self.tid2eid.copy_(draws.argsort(dim=1)[:, : self.top_k].to(self.tid2eid.device))

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if token_ids is None:
            raise ValueError("a hash-routed MoE layer needs the token ids")
        scores = routing_scores(x, self.weight, self.scoring_func)
        expert_ids = self.tid2eid[token_ids.reshape(-1)]
        return gate_weights(scores, expert_ids, self.norm_topk_prob, self.routed_scaling_factor), expert_ids, scores


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """x [N, in] (rows sorted by group) @ weight[g].T for each group g → [N, out]; weight is [G, out, in].

    F.grouped_mm has no autocast rule, so this applies the one nn.Linear gets (linear_compute_dtype). The
    grouped-GEMM kernels want every row stride 16-byte aligned; odd sizes are zero-padded, which changes no result
    (the padding multiplies zeros).
    """
    dtype = linear_compute_dtype(weight)
    x, weight = x.to(dtype), weight.to(dtype)
    if x.shape[0] == 0:  # an expert-parallel rank may receive no rows; grouped_mm's backward rejects that shape
        return x @ weight[0].T  # empty, and the weight still gets its (zero) gradient
    align = 16 // x.element_size()
    pad_in, pad_out = -x.shape[1] % align, -weight.shape[1] % align
    if pad_in or pad_out:
        x = F.pad(x, (0, pad_in))
        weight = F.pad(weight, (0, pad_in, 0, pad_out))
    out = F.grouped_mm(x, weight.transpose(-2, -1), offs=group_ends)
    return out[:, : out.shape[1] - pad_out] if pad_out else out


GroupedGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@eager  # inside compiled blocks: no compiled fp32 grouped GEMM on CPUs
def expert_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    group_ends: torch.Tensor,
    gemm: GroupedGemm = grouped_mm,
    limit: float = 0.0,
) -> torch.Tensor:
    """Every expert's SwiGLU over its rows: x [N, dim] sorted by expert, group_ends [E] int32 cumulative counts."""
    gate, up = gemm(x, gate_up, group_ends).chunk(2, dim=-1)
    return gemm(swiglu(gate, up, limit), down, group_ends)


class RoutedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: gate_up [E, 2·I, dim] (rows [gate; up]), down [E, dim, I]."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, limit: float = 0.0):
        super().__init__()
        self.n_experts, self.hidden_dim, self.limit = n_experts, hidden_dim, limit
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.down = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.gemm: GroupedGemm = grouped_mm  # nanoseek.fp8 swaps in its FP8 grouped GEMM

    def forward(self, x: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        """x [N, dim], rows sorted by expert; group_ends [E] int32 cumulative row counts → [N, dim]."""
        return expert_ffn(x, self.gate_up, self.down, group_ends, self.gemm, self.limit)


def sort_by_expert(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (token, slot) pairs ordered by expert (stable), and tokens per expert [E] (int64). The counts are
    a scatter-add, not bincount, which on CUDA reads its input's maximum back to the host (a sync per layer)."""
    flat = expert_ids.flatten()
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return flat.argsort(stable=True), counts


class MoE(KeepsDtype, nn.Module):
    kept_dtype = ("expert_load",)  # token counts: bf16 would stop counting at 256

    def __init__(self, config: ModelConfig, hashed: bool = False):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router: Router | HashRouter = HashRouter(config) if hashed else Router(config)
        limit = config.swiglu_limit
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, limit)
        self.shared = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, limit)
            if config.n_shared_experts
            else None
        )
        # Tokens routed to each expert by the latest forward: the load signal for aux-loss-free balancing.
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, terms: ForwardTerms | None = None
    ) -> torch.Tensor:
        """x [..., dim] → [..., dim]; token_ids [...] are what a hash router routes by. With terms.balance_alpha
        > 0 (and autograd on), the sequence-wise balance loss goes to terms.balance_loss, or, with
        terms.inject_balance, into the gradients directly."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, expert_ids, scores = self.router(x, token_ids)
        order, counts = sort_by_expert(expert_ids, self.experts.n_experts)
        self.expert_load += counts.detach()  # accumulates over micro-batches; the trainer zeroes it each step
        slots = torch.arange(order.numel(), device=order.device)
        unorder = torch.empty_like(order).scatter_(0, order, slots)  # the inverse permutation
        routed = self.experts(_GatherRows.apply(x, order, unorder, self.top_k), counts.cumsum(0).to(torch.int32))
        # Back to (token, slot) order, then a weighted sum over the k slots: deterministic, unlike index_add_. One
        # batched [1, k] @ [k, dim] per token, which reads the slots once (a product then a sum writes them again).
        unsorted = _GatherRows.apply(routed, unorder, order, 1)
        dtype = torch.promote_types(unsorted.dtype, x.dtype)
        y = torch.bmm(weights.unsqueeze(1).to(dtype), unsorted.view(-1, self.top_k, shape[-1]).to(dtype)).squeeze(1)
        if self.shared is not None:
            y = y + self.shared(x)
        if terms is not None and terms.balance_alpha > 0 and torch.is_grad_enabled():
            loss = terms.balance_alpha * self.sequence_balance_loss(
                scores.view(*shape[:-1], -1), expert_ids.view(shape[0], -1)
            )
            if terms.inject_balance:
                y = _WithLossGradient.apply(y, loss)
            else:
                terms.add_balance(loss)
        return y.view(shape)

    def sequence_balance_loss(self, scores: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """V3's complementary sequence-wise loss Σ_i f_i·P_i (before its α), averaged over sequences:
        f_i = N_r/(K_r·T) · tokens of the sequence routed to i,
        P_i = mean over its tokens of the normalized affinity s_i/Σ_j s_j.
        scores [B, T, E], expert_ids [B, T·k]."""
        n_experts, tokens = scores.shape[-1], scores.shape[1]
        affinity = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        ones = torch.ones_like(expert_ids, dtype=scores.dtype)
        picks = torch.zeros_like(affinity).scatter_add_(1, expert_ids, ones)
        fraction = picks * n_experts / (self.top_k * tokens)
        return (fraction * affinity).sum(dim=-1).mean()


class _GatherRows(torch.autograd.Function):
    """x [N, dim] → x[slots // k] [N·k, dim], where `slots` is a permutation of the N·k (token, slot) pairs and
    `unslots` its inverse. The backward gathers too: grad[unslots], then each token's k rows summed in slot order.
    The autograd of plain indexing would scatter instead (an accumulating index_put, a third of an MoE step on CPUs,
    and order-dependent where it uses atomics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slots: torch.Tensor, unslots: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(unslots)
        ctx.k = k
        return x.index_select(0, slots // k if k > 1 else slots)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (unslots,) = ctx.saved_tensors
        grad = grad.index_select(0, unslots)
        return (grad.view(-1, ctx.k, grad.shape[-1]).sum(dim=1) if ctx.k > 1 else grad), None, None, None


class _WithLossGradient(torch.autograd.Function):
    """Identity on y whose backward also gives `loss` the gradient 1, exactly as if the caller had added it to its
    loss: how a balance loss reaches the gradients when a pipeline schedule owns the loss function."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape = loss.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.new_ones(ctx.loss_shape)
