"""`nanoseek info`: parameter and FLOP accounting against the published figures and the built model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import tiny_config
from nanoseek import Transformer
from nanoseek.flops import model_stats


def _info(spec: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "nanoseek", "info", spec, "--json"], capture_output=True, text=True,
                         check=True).stdout
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
    model = Transformer(config)
    stats = model_stats(config)
    own = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert stats.total_params == own
    assert stats.mtp_unique_params == sum(p.numel() for p in model.mtp.parameters())
    inactive = model.layers[1].mlp.experts.gate_up.numel() + model.layers[1].mlp.experts.down.numel()
    inactive *= (config.n_routed_experts - config.num_experts_per_tok) / config.n_routed_experts
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    # tied: the embedding table is the head, which every token multiplies through
    assert stats.active_params == own - round(inactive * moe_layers)
