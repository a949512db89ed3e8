"""`nanoseek info`: parameter and FLOP accounting against the published figures and the built model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import tiny_config, tiny_dense_config
from nanoseek import build_model
from nanoseek.flops import model_stats
from nanoseek.presets import preset


def _info(spec: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "nanoseek", "info", spec, "--json"], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def test_v3_matches_the_report():
    info = _info("v3")
    assert info["total_params"] == pytest.approx(671e9, rel=0.005)
    assert info["active_params"] == pytest.approx(37e9, rel=0.03)
    assert info["mtp_params"] == pytest.approx(14e9, rel=0.05)
    # 576 cached elements per token per layer (bf16), 1.76 % of an MHA with 128 heads of 128
    assert info["kv_bytes_per_token"] == (512 + 64) * 61 * 2
    assert info["kv_cache_ratio"] == pytest.approx(0.0176, abs=5e-4)
    assert 6 * 36e9 < info["flops_per_token"] < 6 * 45e9


def test_v2_lite_matches_the_paper():
    info = _info("v2-lite")
    assert info["total_params"] == pytest.approx(15.7e9, rel=0.005)
    assert info["active_params"] == pytest.approx(2.4e9, rel=0.03)
    assert info["mtp_params"] == 0


def test_counts_equal_the_built_model():
    config = tiny_config(num_nextn_predict_layers=2, tie_word_embeddings=True)
    model = build_model(config)
    stats = model_stats(config)
    own = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert stats.total_params == own
    assert stats.mtp_unique_params == sum(p.numel() for p in model.mtp.parameters())
    inactive = model.layers[1].mlp.experts.gate_up.numel() + model.layers[1].mlp.experts.down.numel()
    inactive *= (config.n_routed_experts - config.num_experts_per_tok) / config.n_routed_experts
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    # tied: the embedding table is the head, which every token multiplies through
    assert stats.active_params == own - round(inactive * moe_layers)


def test_v32_attends_to_topk_and_caches_the_indexer_key():
    """V3.2's indexer adds ~0.1 % parameters (64 heads of 128 per layer), 128 cached values per token and layer,
    and caps each query's keys at 2048: at seq ≤ 2048 it costs more FLOPs than V3, at 128K far fewer."""
    v3, v32 = model_stats(preset("v3"), 131072), model_stats(preset("v32"), 131072)
    assert v32.total_params / v3.total_params == pytest.approx(1.0, abs=0.01) and v32.total_params > v3.total_params
    assert v32.kv_bytes_per_token == (512 + 64 + 128) * 61 * 2
    short_v3, short_v32 = model_stats(preset("v3"), 2048), model_stats(preset("v32"), 2048)
    indexer_core = 3 * 61 * 2 * 64 * 129 * (2048 + 1) / 2  # training: 3 × the forward's dots over visible keys
    indexer_params = 3 * 2 * (v32.active_params - v3.active_params)
    assert short_v32.flops_per_token == pytest.approx(short_v3.flops_per_token + indexer_core + indexer_params)
    # at 128K, each query attends to 2048 keys instead of 64K on average
    assert v32.flops_per_token < 0.4 * v3.flops_per_token


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """The experts' grouped GEMM, [rows, k] by [experts, k, n] at group offsets: 2·rows·k·n."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


@pytest.mark.parametrize("kind", ["mla-dense", "mla-moe", "v32", "gqa"])
def test_the_flop_formula_counts_the_matrices_the_forward_multiplies(kind):
    """Against torch's FlopCounterMode on the built model's forward (not against a copy of the formula): the
    formula's FLOPs without the attention core are exactly the forward's matrix multiplies, the routed experts'
    grouped GEMM included. (Left out of both: the k-way weighted sum of the experts' outputs, a bmm of k
    multiply-adds per channel, which the formula does not count as a matrix.)"""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from helpers import V32
    from nanoseek.flops import attention_core_flops

    config = {
        "mla-dense": lambda: tiny_config(num_nextn_predict_layers=0, first_k_dense_replace=3),
        "mla-moe": lambda: tiny_config(num_nextn_predict_layers=0),
        "v32": lambda: tiny_config(num_nextn_predict_layers=0, first_k_dense_replace=3, **V32),
        "gqa": tiny_dense_config,
    }[kind]()
    length = 32
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with counter, torch.no_grad():
        build_model(config).eval()(torch.randint(0, config.vocab_size, (1, length)))
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    core = float(attention_core_flops(config, torch.arange(1, length + 1, dtype=torch.float64)).sum())
    forward = model_stats(config, length).flops_per_token * length / 3  # training = 3 × forward
    assert forward - core == counted["aten.mm"] + counted.get("aten._grouped_mm", 0), counted
    assert ("aten._grouped_mm" in counted) == (kind == "mla-moe")


def test_v4s_flop_formula_counts_the_matrices_the_forward_multiplies():
    """V4 (sliding, CSA and HCA layers, a hash-routed layer, hyper-connections, compressors, indexer) against
    FlopCounterMode on the forward: the formula's FLOPs without the attention core are the
    matrix multiplies, the grouped output projection's included (an einsum: a bmm over the o_groups blocks, told
    apart from the attention core's bmm by its shape). Its parameters that scale or shift (hyper-connection bases and
    scales, sinks, the compressors' position biases) are not matrices: counted, they would make the formula larger.
    MTP: each depth is one more module of the same shape, so two depths cost twice one (they were counted four
    times once: every module's parameters times the depth)."""
    import torch
    from test_parity_v4 import v4_config
    from torch.utils.flop_counter import FlopCounterMode, bmm_flop

    from nanoseek.flops import attention_core_flops

    config = v4_config(num_nextn_predict_layers=0)
    length, projection = 32, []

    def bmm_flops(a_shape, b_shape, *args, **kwargs) -> int:
        flops = bmm_flop(a_shape, b_shape)
        if a_shape[0] == config.o_groups and b_shape[-1] == config.o_lora_rank:
            projection.append(flops)
        return flops

    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops, torch.ops.aten.bmm: bmm_flops}
    )
    ids = torch.randint(0, config.vocab_size, (1, length))
    with counter, torch.no_grad():
        build_model(config).eval()(ids)
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    core = float(attention_core_flops(config, torch.arange(1, length + 1, dtype=torch.float64)).sum())
    forward = model_stats(config, length).flops_per_token * length / 3
    assert len(projection) == config.num_hidden_layers
    assert forward - core == counted["aten.mm"] + counted["aten._grouped_mm"] + sum(projection), counted
    one, two = (model_stats(v4_config(num_nextn_predict_layers=n), length).mtp_flops_per_token for n in (1, 2))
    assert two == 2 * one > 0


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_the_attention_core_is_half_the_square_a_dense_kernel_computes(kind):
    """The formula's attention core (QKᵀ and AV over the keys each query sees) against what torch's math kernel
    multiplies, counted: it computes every query against every key, so the causal core is (T + 1) / 2T of that.
    (v_head_dim equals the query/key width, so that no padding of V enters the count.)"""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from nanoseek.flops import attention_core_flops

    config = (
        tiny_config(num_nextn_predict_layers=0, first_k_dense_replace=3, v_head_dim=12)
        if kind == "mla"
        else tiny_dense_config()
    )
    length = 32
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        build_model(config).eval()(torch.randint(0, config.vocab_size, (1, length)))
    square = counter.get_flop_counts()["Global"][torch.ops.aten.bmm]
    core = float(attention_core_flops(config, torch.arange(1, length + 1, dtype=torch.float64)).sum())
    assert core == pytest.approx(square * (length + 1) / (2 * length), rel=1e-9)
