"""Checkpoint boundary: FP8 checkpoints, sharding, and clear errors for broken directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from helpers import V32, assert_logits_match, released, tiny_config
from nanoseek.fp8.quant import E4M3_MAX, dequantize_blocks, quantize_blocks


def _model(**overrides) -> nanoseek.DeepseekV3Model:
    torch.manual_seed(0)
    return nanoseek.build_model(tiny_config(**overrides)).eval()


def test_blockwise_quantization_roundtrip_within_e4m3_bound():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 200)  # ragged edges, wide dynamic range across blocks
    q, scale_inv = quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 2)
    back = dequantize_blocks(q, scale_inv)
    # E4M3: 3 mantissa bits → relative error ≤ 2^-4 for normals; below 2^-6 the step is the subnormal 2^-9.
    scale = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((back - w).abs() <= bound).all()
    assert (q.float().abs().amax() <= E4M3_MAX) and q.float().abs().amax() > E4M3_MAX / 2


@pytest.mark.parametrize("overrides", [dict(), V32], ids=["v3", "v32"])
def test_fp8_checkpoint_loads_within_quantization_error(tmp_path, overrides):
    """Every projection in E4M3 with 128×128 block scales (V3.2: the indexer's wq_b and wk too)."""
    model = _model(hidden_size=160, q_lora_rank=136, intermediate_size=272, **overrides)
    nanoseek.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    quantizable = [
        k for k, t in tensors.items() if t.dim() == 2 and ("proj" in k or "indexer.w" in k) and "eh_proj" not in k
    ]
    assert any("experts.0" in k for k in quantizable) and any("kv_b_proj" in k for k in quantizable)
    assert not overrides or any("indexer.wk" in k for k in quantizable)
    for key in quantizable:
        tensors[key], tensors[key.removesuffix(".weight") + ".weight_scale_inv"] = quantize_blocks(tensors[key])
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = nanoseek.load_pretrained(tmp_path)
    for (name, exact), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        err = (got - exact).abs().max().item()
        assert err <= exact.abs().max().item() * 2**-4 + 1e-6, name
    if overrides:  # V3.2: quantized index scores pick other tokens here and there, a discrete change of logits
        return
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()


def _hand_built_fp8(
    rows: int, cols: int, seed: int, unit: float = 1 / 37
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E4M3 codes drawn at random (NaN codes left out), a distinct scale per 128×128 block (multiples of `unit`),
    and the dequantized weight written out block by block, ragged edge blocks included: (codes, scale_inv, weight)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=generator)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # 0x7F/0xFF are NaN in E4M3
    q = codes.view(torch.float8_e4m3fn)
    grid = (-(-rows // 128), -(-cols // 128))
    scale = (torch.arange(grid[0] * grid[1], dtype=torch.float32).reshape(grid) + 1) * unit
    weight = torch.empty(rows, cols)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            weight[block] = q[block].float() * scale[i, j]
    return q, scale, weight


def test_fp8_blocks_dequantize_element_by_element_at_v3s_ragged_shape(tmp_path):
    """V3's kv_a_proj_with_mqa as released (tests/fixtures/releases: [576, 7168], a 5×56 scale grid whose last row
    of blocks holds 64 rows): every element is its code times its own block's scale."""
    from nanoseek.checkpoint.hf import SafetensorsDir

    _, tensors = released("deepseek-v3")
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa"
    shape, grid = tensors[f"{name}.weight"][1], tensors[f"{name}.weight_scale_inv"][1]
    q, scale, weight = _hand_built_fp8(*shape, seed=0)
    assert tuple(scale.shape) == grid == (5, 56)
    save_file({f"{name}.weight": q, f"{name}.weight_scale_inv": scale}, tmp_path / "model.safetensors")
    assert torch.equal(SafetensorsDir(tmp_path).get(f"{name}.weight"), weight)


def test_fp8_checkpoint_equals_the_model_holding_its_dequantized_weights(tmp_path):
    """Every projection hand-quantized (ragged blocks on both axes: 20-row kv_a_proj_with_mqa, 160 columns, 136-row
    q_a_proj): loaded from FP8 it is, tensor by tensor and in its logits, the model loaded from the dequantized
    weights written in full precision."""
    model = _model(hidden_size=160, q_lora_rank=136, intermediate_size=272)
    nanoseek.save_pretrained(model, tmp_path / "fp8")
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    dequantized = dict(tensors)
    projections = [k for k, t in tensors.items() if t.dim() == 2 and "_proj" in k and "eh_proj" not in k]
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in projections
    for n, key in enumerate(projections):  # scales of ~1e-3: codes reach ±448, weights stay below ~0.5
        tensors[key], tensors[key.removesuffix(".weight") + ".weight_scale_inv"], dequantized[key] = _hand_built_fp8(
            *tensors[key].shape, seed=n, unit=2e-4
        )
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    (tmp_path / "plain").mkdir()
    save_file(dequantized, tmp_path / "plain" / "model.safetensors")
    (tmp_path / "plain" / "config.json").write_bytes((tmp_path / "fp8" / "config.json").read_bytes())
    fp8, plain = nanoseek.load_pretrained(tmp_path / "fp8"), nanoseek.load_pretrained(tmp_path / "plain")
    for (name, a), b in zip(fp8.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_match(fp8(ids), plain(ids), relative=1e-5)


def test_sharded_save_roundtrip(tmp_path):
    model = _model(num_nextn_predict_layers=1)
    nanoseek.save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and not (tmp_path / "model.safetensors").exists()
    loaded = nanoseek.load_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    # saving again unsharded leaves no stale index behind
    nanoseek.save_pretrained(model, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(nanoseek.load_pretrained(tmp_path)(ids), model(ids))


def test_mtp_layer_stored_as_layer_num_hidden_layers(tmp_path):
    model = _model(num_nextn_predict_layers=1)
    nanoseek.save_pretrained(model, tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    for name in (
        "enorm",
        "hnorm",
        "eh_proj",
        "shared_head.norm",
        "shared_head.head",
        "embed_tokens",
        "self_attn.kv_b_proj",
        "mlp.experts.7.down_proj",
        "mlp.gate",
    ):
        assert f"model.layers.3.{name}.weight" in keys


def test_load_dtype_and_bias_precision(tmp_path):
    nanoseek.save_pretrained(_model(), tmp_path)
    model = nanoseek.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert all(m.router.expert_bias.dtype == torch.float32 for m in model.moe_layers())


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "truncated"),
        ("no-config", "no config.json"),
        ("no-weights", r"no \*\.safetensors"),
        ("missing-key", "missing tensor"),
        ("no-correction-bias", "missing tensor"),  # sigmoid routing: only V2's softmax predates the bias
        ("wrong-shape", "does not match config.json"),
        ("extra-key", "has no place"),
        ("bad-config", "num_experts_per_tok"),
    ],
)
def test_broken_checkpoint_gives_one_clear_error(tmp_path, damage, message):
    nanoseek.save_pretrained(_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no-config":
        (tmp_path / "config.json").unlink()
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "bad-config":
        config = json.loads((tmp_path / "config.json").read_text())
        config["num_experts_per_tok"] = 99
        (tmp_path / "config.json").write_text(json.dumps(config))
    else:
        tensors = load_file(weights)
        if damage == "missing-key":
            del tensors["model.layers.1.self_attn.o_proj.weight"]
        elif damage == "no-correction-bias":
            del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
        elif damage == "wrong-shape":
            tensors["model.norm.weight"] = torch.ones(7)
        else:
            tensors["model.layers.1.mlp.foo.weight"] = torch.ones(2)
        save_file(tensors, weights)
    with pytest.raises(nanoseek.CheckpointError, match=message):
        nanoseek.load_pretrained(tmp_path)
