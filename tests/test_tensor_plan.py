"""How tensor + expert parallel inference lays a model over N ranks (parallel/tensor_plan.py): every rank's parts
put back together are the model, a split MLP summed over ranks is the whole one, and `nanoseek info
--tensor-parallel-size` counts what each device holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanoseek.checkpoint.hf import meta_tensors, to_hf_state_dict, weight_bytes
from nanoseek.models.registry import build_model
from nanoseek.parallel.tensor_plan import Split, per_device_tensors, split_of
from nanoseek.presets import preset

SIZE = 2


@pytest.mark.parametrize("name", ["tiny", "tiny-v32", "tiny-v4"])
def test_the_ranks_parts_put_together_are_the_model(name):
    """Column parts concatenated along dim 0 and row parts along dim 1 give the tensor back, each routed expert is
    on exactly one rank (a contiguous range, as DeepSeek's inference code places them), replicated tensors are on
    every rank whole; the attention's per-head projections are split, the latent down-projections not."""
    config = preset(name).replace(num_nextn_predict_layers=1)
    torch.manual_seed(0)
    tensors = to_hf_state_dict(build_model(config))
    ranks = [per_device_tensors(tensors, r, SIZE, config.n_routed_experts) for r in range(SIZE)]
    splits = {split_of(k) for k in tensors}
    assert splits == set(Split)
    for key, whole in tensors.items():
        parts = [rank[key] for rank in ranks if key in rank]
        split = split_of(key)
        if split is Split.EXPERTS:
            assert len(parts) == 1 and torch.equal(parts[0], whole)
        elif split is Split.REPLICATED:
            assert len(parts) == SIZE and all(torch.equal(p, whole) for p in parts)
        else:
            assert torch.equal(torch.cat(parts, dim=0 if split is Split.COLUMN else 1), whole), key
    first = [k for k in ranks[0] if split_of(k) is Split.EXPERTS and ".layers.1." in k]
    assert {int(k.split(".experts.")[1].split(".")[0]) for k in first} == set(range(config.n_routed_experts // SIZE))
    attention = [k for k in tensors if "attn." in k and ".indexer." not in k and ".compressor." not in k]
    by_name = {k.rsplit(".", 2)[-2]: split_of(k) for k in attention if k.endswith(".weight")}
    column, kept = ("q_b_proj", "kv_b_proj", "wq_b", "wo_a"), ("q_a_proj", "kv_a_proj_with_mqa", "wq_a", "wkv")
    assert [by_name[k] for k in column if k in by_name] == [Split.COLUMN] * 2
    assert [by_name[k] for k in kept if k in by_name] == [Split.REPLICATED] * 2
    assert any(".indexer." in k for k in tensors) == (name != "tiny")
    assert all(split_of(k) is Split.REPLICATED for k in tensors if ".indexer." in k or ".compressor." in k)


def test_a_split_mlp_summed_over_the_ranks_is_the_whole():
    """The column parts of gate/up and the row part of down, each rank's SwiGLU on its slice: the partial outputs
    sum (the all_reduce) to the dense MLP's and the shared experts' output."""
    config = preset("tiny")
    torch.manual_seed(0)
    tensors = to_hf_state_dict(build_model(config))
    ranks = [per_device_tensors(tensors, r, SIZE, config.n_routed_experts) for r in range(SIZE)]
    x = torch.randn(5, config.hidden_size)

    def mlp(weights: dict, prefix: str) -> torch.Tensor:
        gate, up, down = (weights[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T

    for prefix in ("model.layers.0.mlp", "model.layers.1.mlp.shared_experts"):
        summed = sum(mlp(rank, prefix) for rank in ranks)
        assert (summed - mlp(tensors, prefix)).abs().max().item() < 1e-5, prefix


def _info(*argv: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "nanoseek", "info", *argv, "--json"], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def test_info_counts_what_each_device_holds():
    """V4-Flash over 8 devices: each holds an eighth of the split weights and all of the replicated ones (a few %
    more than an eighth of the whole, released or in bf16), and a sequence's whole cache; over 1, the model."""
    whole = _info("v4-flash")
    split = _info("v4-flash", "--tensor-parallel-size", "8")["per_device"]
    assert split["tensor_parallel_size"] == 8
    for form in ("bf16", "released"):
        assert 1.0 < split["weight_bytes"][form] * 8 / whole["weight_bytes"][form] < 1.1, form
    config = preset("v4-flash")
    tensors = meta_tensors(config)
    replicated = {k: t for k, t in tensors.items() if split_of(k) is Split.REPLICATED}
    rest = weight_bytes(config, {k: t for k, t in tensors.items() if k not in replicated})["bf16"]
    assert split["weight_bytes"]["bf16"] == weight_bytes(config, replicated)["bf16"] + rest // 8
    single = _info("v4-flash", "--tensor-parallel-size", "1")["per_device"]
    assert single["weight_bytes"] == whole["weight_bytes"]
    assert split["cache_bytes_per_sequence"] == single["cache_bytes_per_sequence"]
    assert list(single["cache_bytes_per_sequence"]) == ["4096", "131072", "1048576"]


@pytest.mark.parametrize(
    "spec, size, message",
    [
        ("v4-flash", "3", "--tensor-parallel-size 3 does not divide num_attention_heads (64)"),
        ("v3", "0", "--tensor-parallel-size must be at least 1, got 0"),
        ("tiny-dense", "2", "tensor parallelism is laid out for DeepSeek's generations"),
    ],
)
def test_info_refuses_a_split_the_model_does_not_divide_into(capsys, spec, size, message):
    from nanoseek.cli import main

    assert main(["info", spec, "--tensor-parallel-size", size]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek: error: ") and message in err and len(err.strip().splitlines()) == 1
