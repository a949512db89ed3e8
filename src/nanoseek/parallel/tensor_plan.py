"""How tensor + expert parallel inference lays a DeepSeek model over N ranks (vLLM's and DeepSeek's inference
layout), tensor by tensor, under the names of checkpoint/hf.py's `to_hf_state_dict`:

    COLUMN      rows (dim 0) split: a rank's attention heads (q_b/kv_b, V4's wq_b, its output groups' wo_a, the
                sinks), its slice of a dense or shared-expert MLP's intermediate, its slice of the vocabulary
    ROW         columns (dim 1) split: the matrix after a COLUMN one (o_proj, wo_b, down_proj); the ranks' partial
                outputs are summed
    EXPERTS     routed expert e on rank e // (n_routed_experts / N)
    REPLICATED  every rank holds it whole: norms, routers, the latent down-projections (q_a, kv_a: MLA's latent and
                V4's single key-value head are read by every head), V3.2's and V4's indexers and compressors, V4's
                hyper-connections, MTP's eh_proj

The cache is not split: MLA's latent and V4's one key-value head serve every head, so each rank caches the whole
of the sequences it runs (as vLLM does without data-parallel attention)."""

from __future__ import annotations

import re
from enum import Enum

import torch

from nanoseek.checkpoint.hf import meta_tensors, weight_bytes
from nanoseek.config import ModelConfig
from nanoseek.errors import ConfigError
from nanoseek.flops import cache_bytes


class Split(Enum):
    COLUMN = "column"
    ROW = "row"
    EXPERTS = "experts"
    REPLICATED = "replicated"


_EXPERT = re.compile(r"\.experts\.(\d+)\.")
# first match wins: the indexers' and compressors' wq_b / wkv before attention's
_PLAN = [
    (re.compile(r"\.(indexer|compressor)\."), Split.REPLICATED),
    (_EXPERT, Split.EXPERTS),
    (re.compile(r"(^|\.)(embed_tokens|lm_head|head)\.weight$"), Split.COLUMN),
    (re.compile(r"\.self_attn\.(q_b_proj|kv_b_proj)\.weight$"), Split.COLUMN),
    (re.compile(r"\.attn\.(wq_b\.weight|wo_a\.weight|attn_sink)$"), Split.COLUMN),
    (re.compile(r"\.(self_attn\.o_proj|attn\.wo_b)\.weight$"), Split.ROW),
    (re.compile(r"\.(mlp|ffn)\.(shared_experts\.)?(gate_proj|up_proj|w1|w3)\.weight$"), Split.COLUMN),
    (re.compile(r"\.(mlp|ffn)\.(shared_experts\.)?(down_proj|w2)\.weight$"), Split.ROW),
]


_DIVIDED = (
    "num_attention_heads",
    "o_groups",
    "vocab_size",
    "n_routed_experts",
    "moe_intermediate_size",
    "intermediate_size",
)


def split_of(name: str) -> Split:
    """How tensor `name` (to_hf_state_dict's) is laid over the ranks."""
    return next((split for pattern, split in _PLAN if pattern.search(name)), Split.REPLICATED)


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """ConfigError in one line if the model cannot be split over `size` ranks: every split count must divide."""
    if size < 1:
        raise ConfigError(f"--tensor-parallel-size must be at least 1, got {size}")
    if config.architecture == "llama":
        raise ConfigError("tensor parallelism is laid out for DeepSeek's generations, not the dense llama baseline")
    # what the splits divide: heads (and V4's output groups), the vocabulary, experts, the MLPs' intermediates
    counts = {field: getattr(config, field) for field in _DIVIDED if hasattr(config, field)}
    for field, count in counts.items():
        if count % size:
            raise ConfigError(f"--tensor-parallel-size {size} does not divide {field} ({count})")


def shard(name: str, tensor: torch.Tensor, rank: int, size: int, experts: int) -> torch.Tensor | None:
    """Rank `rank`'s part of tensor `name` (a view) in a model of `experts` routed experts, or None where the rank
    holds none of it (another rank's expert)."""
    split = split_of(name)
    if split is Split.REPLICATED:
        return tensor
    if split is Split.EXPERTS:
        expert = int(_EXPERT.search(name).group(1))
        return tensor if expert // (experts // size) == rank else None
    dim = 0 if split is Split.COLUMN else 1
    part = tensor.shape[dim] // size
    return tensor.narrow(dim, rank * part, part)


def per_device_tensors(tensors: dict[str, torch.Tensor], rank: int, size: int, experts: int) -> dict[str, torch.Tensor]:
    """What rank `rank` of `size` holds of a model's tensors."""
    parts = {name: shard(name, t, rank, size, experts) for name, t in tensors.items()}
    return {name: t for name, t in parts.items() if t is not None}


DEVICE_CONTEXTS = (4096, 131072, 1 << 20)  # what `nanoseek info --tensor-parallel-size` counts the cache at


def device_bytes(
    config: ModelConfig,
    size: int,
    tensors: dict[str, torch.Tensor] | None = None,
    contexts: tuple[int, ...] = DEVICE_CONTEXTS,
) -> dict:
    """What one device holds when the model is split over `size` ranks, counted from meta shapes (`tensors`: the
    model's meta_tensors, if built already): its weights (in bf16, and as DeepSeek releases the generation
    quantized), and the cache of one sequence at each context (bf16; whole on every rank)."""
    check_tensor_parallel(config, size)
    tensors = meta_tensors(config) if tensors is None else tensors
    tensors = per_device_tensors(tensors, 0, size, config.n_routed_experts)
    return {
        "tensor_parallel_size": size,
        "weight_bytes": weight_bytes(config, tensors),
        "cache_bytes_per_sequence": {str(L): cache_bytes(config, L) for L in contexts},
    }
