"""ModelConfig: validation with one clear message, and config.json in both published forms."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import V32, YARN, tiny_config, tiny_dense_config
from nanoseek import ConfigError, ModelConfig
from nanoseek.config import DeepseekV3Config, DeepseekV32Config
from nanoseek.presets import preset


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(n_group=3), "n_group"),
        (dict(topk_group=3), "topk_group"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(kv_lora_rank=-4), "kv_lora_rank"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(n_group=8, topk_group=1, num_experts_per_tok=2), "topk_group"),
        (dict(num_hidden_layers=2.5), "num_hidden_layers"),
        (dict(attention_type="mqa"), "attention_type"),  # no such field: the class is the architecture
        (dict(head_dim=8), "head_dim"),  # a Llama's field, not a V3's
        (dict(index_n_heads=4, index_head_dim=3), "index_head_dim"),  # a V3.2 (V3 + the indexer) and its checks
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(first_k_dense_replace=1), "first_k_dense_replace"),  # every Llama layer is dense: no such field
        (dict(num_nextn_predict_layers=1), "num_nextn_predict_layers"),
        (dict(rope_scaling=YARN), "rope_scaling"),
    ],
)
def test_bad_dense_baseline_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        tiny_dense_config(**overrides)


def test_each_generation_is_its_own_class():
    """V3.2 is V3 plus the indexer (a subclass: what reads V3 reads it), V4 and the baseline classes of their own;
    config.json's model_type picks the class, and the class must agree with the file."""
    v3 = tiny_config()
    v32 = v3.replace(**V32)
    assert type(v3) is DeepseekV3Config and type(v32) is DeepseekV32Config and isinstance(v32, DeepseekV3Config)
    assert not hasattr(v3, "index_n_heads") and v32.cache_width == v3.cache_width + V32["index_head_dim"]
    with pytest.raises(ConfigError, match="'index_n_heads'"):  # V3's dense attention is a V3 config
        v32.replace(index_n_heads=0)
    for config in (v3, v32, preset("tiny-v4"), tiny_dense_config()):
        assert type(ModelConfig.from_hf_dict(config.to_hf_dict())) is type(config)
    with pytest.raises(ConfigError, match="'deepseek_v4' is not a DeepseekV3Config"):
        DeepseekV3Config.from_hf_dict(preset("tiny-v4").to_hf_dict())
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf_dict({"model_type": "mistral"})


@pytest.mark.parametrize("style", ["transformers", "deepseek"])
def test_config_json_roundtrip(style, tmp_path):
    config = tiny_config(rope_scaling=YARN, q_lora_rank=None, num_nextn_predict_layers=1)
    config.save_json(tmp_path / "config.json", style=style)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert ("rope_parameters" in raw) == (style == "transformers")
    assert ModelConfig.load_json(tmp_path / "config.json") == config


def test_reads_published_deepseek_v3_config():
    """The fields of DeepSeek-V3's released config.json that matter (FP8 quantization_config included)."""
    published = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "ep_size": 1,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "attention_bias": False,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
    }
    assert ModelConfig.from_hf_dict(published) == preset("v3")


def test_v2_greedy_routing_ignores_groups():
    config = ModelConfig.from_hf_dict(
        {**preset("v2-lite").to_hf_dict("deepseek"), "n_group": 8, "topk_group": 3, "topk_method": "greedy"}
    )
    assert (config.n_group, config.topk_group, config.scoring_func) == (1, 1, "softmax")


def test_unsupported_features_are_refused():
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_hf_dict({"hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="rope type"):
        ModelConfig.from_hf_dict({"rope_scaling": {"type": "dynamic", "factor": 2.0}})


def test_cli_bad_config_is_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**tiny_config().to_hf_dict(), "topk_group": 5}))
    result = subprocess.run([sys.executable, "-m", "nanoseek", "info", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "topk_group" in result.stderr
    assert "Traceback" not in result.stderr
