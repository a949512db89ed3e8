"""DeepSeek Sparse Attention's two training stages (DeepSeek-V3.2 §2.1), as the trainer applies them.

1. Dense warm-up: attention stays dense and every parameter but the lightning indexers' is frozen; each indexer
   learns KL(p ‖ softmax(I)), p being its layer's attention distribution summed over heads and L1-normalized, so
   that it learns to point where attention already looks (DeepSeek: 1000 steps, 2.1B tokens).
2. Sparse training: each query attends to its indexer's top-k; the whole model learns from the LM loss, and each
   indexer only from the same KL restricted to the tokens it selected (its input is detached from the model's
   graph, so the two losses touch disjoint parameters).

A V3 run becomes a V3.2 one by adding indexers (`nanoseek train --from RUN --dsa warmup`, then `--dsa sparse`):
the path DeepSeek took from V3.1-Terminus. A model whose indexer starts random can also train sparse from step 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from nanoseek.checkpoint.hf import load_pretrained
from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError, ConfigError
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import build_model


def configure_indexers(model: DeepseekV3Model, stage: str | None) -> list[nn.Module]:
    """The model's indexers; in the warm-up, everything else stops learning. (The stage itself goes to each
    training forward, in its ForwardTerms.)"""
    indexers = model.indexers()
    if indexers and stage == "warmup":
        learning = {id(p) for indexer in indexers for p in indexer.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in learning)
    return indexers


def check_starting_shapes(config: ModelConfig, source: Path) -> None:
    """Before anything is prepared: the run's model (built on meta) must have the source's shapes, but for the
    indexers it may add."""
    with torch.device("meta"):
        own = build_model(config).state_dict()
        theirs = build_model(ModelConfig.load_json(source / "config.json")).state_dict()
    for key, tensor in theirs.items():
        if key in own and own[key].shape != tensor.shape:
            raise ConfigError(
                f"--from {source}: {key} has shape {tuple(tensor.shape)}, this model "
                f"{tuple(own[key].shape)}: settings that change the source's shapes cannot differ"
            )


@torch.no_grad()
def load_initial_weights(model: DeepseekV3Model, source: Path) -> None:
    """A run started --from a model directory: its weights replace the seeded ones; only parameters the source
    cannot have (the indexers it gains) keep their seeded values. Shapes were checked before anything was prepared
    (check_starting_shapes); here, which tensors the files hold. Works on a sharded model: every rank reads the
    whole source and keeps its own shards."""
    full = load_pretrained(source, device="cpu", dtype=torch.float32).state_dict()
    own = model.state_dict()
    missing = [k for k in own if k not in full and ".indexer." not in k]
    unexpected = [k for k in full if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"--from {source}: its weights are not this model's (missing {missing[:1]}, "
            f"unexpected {unexpected[:1]}); only an indexer may be added"
        )
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
