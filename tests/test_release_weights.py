"""DeepSeek's quantized releases as the files are: a tiny V4 written in V4-Flash's own layout (DeepSeek's names and
config form, FP8 linears and FP4 experts with ue8m0 scales, fp32 hyper-connections, sinks and position biases),
every name and dtype checked against tests/fixtures/releases (written from DeepSeek's index, not from nanoseek);
loaded by transformers (`dequantize=True`) and by nanoseek, dequantized or kept as released, to the same logits in
fp32 and in bf16; the kept weights' bytes; refusals of what nanoseek does not read."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_parity_v4 import _ids, _randomized, v4_config

import nanoseek
from helpers import RELEASE_FIXTURES, assert_logits_match
from nanoseek.checkpoint.hf import weight_bytes
from nanoseek.errors import CheckpointError
from nanoseek.fp8.fp4 import dequantize_fp4, quantize_fp4, unpack_fp4
from nanoseek.fp8.stored import QuantizedExperts, QuantizedLinear, StoredWeight, resident_bytes
from nanoseek.presets import preset

SAVED_BUFFERS = (".values", ".scale", ".expert_bias")  # the weights kept as released, the routing biases
LENGTH = 272  # two HCA entries of 128, 68 CSA entries of 4 (top 8 kept), past the 16-token window


def _config():
    """Widths in whole 128×128 blocks (transformers dequantizes nothing else), V4-Flash's compress rates."""
    return v4_config(
        vocab_size=128,
        hidden_size=256,
        moe_intermediate_size=128,
        num_attention_heads=2,
        head_dim=128,
        q_lora_rank=128,
        o_lora_rank=128,
        qk_rope_head_dim=32,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=8,
        n_routed_experts=8,
        num_nextn_predict_layers=1,
        compress_rate_csa=4,
        compress_rate_hca=128,
        sliding_window=16,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(config, directory of the release, the model it was written from)."""
    config = _config()
    model = _randomized(config).to(torch.bfloat16)  # the release's plain tensors are BF16
    path = tmp_path_factory.mktemp("v4-release")
    nanoseek.save_pretrained(model, path, fp8=True)
    return config, path


def _released_dtypes() -> list[tuple[re.Pattern, str]]:
    spec = json.loads((RELEASE_FIXTURES / "deepseek-v4-flash.json").read_text())
    return [
        (re.compile(re.escape(t).replace(r"\{b\}", r"(layers|mtp)\.\d+").replace(r"\{e\}", r"\d+")), dtype)
        for t, dtype, *_ in spec["tensors"]
    ]


def test_the_release_has_v4_flashs_names_dtypes_and_config(release):
    config, path = release
    patterns = _released_dtypes()
    with safe_open(str(path / "model.safetensors"), "pt") as files:
        written = {k: files.get_slice(k).get_dtype() for k in files.keys()}
    for key, dtype in written.items():
        expected = [d for pattern, d in patterns if pattern.fullmatch(key)]
        assert set(expected) == {dtype}, (key, dtype, expected)  # CSA and HCA share some names
    assert {"F8_E4M3", "F8_E8M0", "I8", "F32", "BF16", "I32"} == set(written.values())
    raw = json.loads((path / "config.json").read_text())
    assert raw["expert_dtype"] == "fp4" and raw["quantization_config"]["scale_fmt"] == "ue8m0"
    assert raw["compress_ratios"] == [0, 4, 128, 4, 0] and raw["num_hash_layers"] == 1


def _transformers_logits(path, config, dtype: torch.dtype) -> torch.Tensor:
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    quantization = FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4")
    theirs = DeepseekV4ForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=dtype).eval()
    with torch.no_grad():
        return theirs(_ids(config, LENGTH)).logits.float()


def test_release_loads_equal_to_transformers_dequantized_and_kept_quantized(release):
    """fp32: transformers' dequantized model, ours dequantized and ours kept as released give the same logits
    (MTP aside: transformers skips it)."""
    config, path = release
    ids = _ids(config, LENGTH)
    plain = nanoseek.load_pretrained(path).eval()
    kept = nanoseek.load_pretrained(path, quantized=True).eval()
    with torch.no_grad():
        expected = plain(ids)
        assert_logits_match(expected, _transformers_logits(path, config, torch.float32), relative=1e-5)
        assert torch.equal(kept(ids), expected)  # dequantized inside the GEMM: exact in fp32
    experts = [m for m in kept.modules() if isinstance(m, QuantizedExperts)]
    linears = [m for m in kept.modules() if isinstance(m, QuantizedLinear)]
    assert len(experts) == config.num_hidden_layers + 1  # every MoE, the MTP depth's too
    assert {m.gate_up.values.dtype for m in experts} == {torch.int8}
    assert {m.weight.values.dtype for m in linears} == {torch.float8_e4m3fn}
    assert all(isinstance(layer.attn.out_down, StoredWeight) for layer in kept.layers)  # wo_a


def test_bf16_keeps_what_deepseek_keeps_in_fp32_and_is_as_close_to_fp32_as_transformers(tmp_path):
    """Loaded in bf16 (kept quantized), the tensors DeepSeek ships in fp32 stay fp32, bit for bit; and the logits
    are no further from the same checkpoint's fp32 logits than transformers' bf16 model (its own fp32 logits are
    ours). Weights at std 0.05: at 0.2 a random V4 is chaotic in bf16 (logits off by ~10 in both)."""
    config = _config().replace(initializer_range=0.05)
    nanoseek.save_pretrained(_randomized(config).to(torch.bfloat16), tmp_path, fp8=True)
    ours = nanoseek.load_pretrained(tmp_path, dtype=torch.bfloat16, quantized=True).eval()
    file = load_file(tmp_path / "model.safetensors")
    layer = ours.layers[2]  # an HCA layer
    for tensor, name in [
        (layer.attn_hc.fn, "layers.2.hc_attn_fn"),
        (layer.attn.sinks, "layers.2.attn.attn_sink"),
        (layer.attn.compressor.position_bias, "layers.2.attn.compressor.ape"),
        (ours.hc_head.scale, "hc_head_scale"),
    ]:
        assert tensor.dtype == torch.float32 and torch.equal(tensor, file[name]), name
    assert ours.embed.weight.dtype == torch.bfloat16
    exact = _transformers_logits(tmp_path, config, torch.float32)
    theirs = _transformers_logits(tmp_path, config, torch.bfloat16)
    with torch.no_grad():
        got = ours(_ids(config, LENGTH)).float()
    ours_off, theirs_off = ((x - exact).abs().amax(-1) for x in (got, theirs))  # per position
    assert ours_off.median() <= 1.1 * theirs_off.median(), (ours_off.median(), theirs_off.median())
    assert ours_off.quantile(0.9) <= 1.1 * theirs_off.quantile(0.9)
    agree = [(x.argmax(-1) == exact.argmax(-1)).float().mean() for x in (got, theirs)]  # near ties abound here
    assert agree[0] >= agree[1] - 0.03, agree


def test_kept_weights_are_the_released_bytes(release):
    """Loaded with quantized=True, the weights take the bytes of the files (FP8 1 byte, FP4 ½, plus scales); at
    V4-Flash's shapes that is 0.27x of bf16 (DeepSeek's ~160 GB against 570 GB)."""
    config, path = release
    kept = nanoseek.load_pretrained(path, dtype=torch.bfloat16, quantized=True)
    plain = nanoseek.load_pretrained(path, dtype=torch.bfloat16)
    with safe_open(str(path / "model.safetensors"), "pt") as files:
        on_disk = sum(files.get_tensor(k).numel() * files.get_tensor(k).element_size() for k in files.keys())
    weights = sum(p.numel() * p.element_size() for p in kept.parameters())
    weights += sum(b.numel() * b.element_size() for n, b in kept.named_buffers() if n.endswith(SAVED_BUFFERS))
    weights += sum(b.numel() * 4 for n, b in kept.named_buffers() if n.endswith("tid2eid"))  # I32 on disk
    assert weights == on_disk
    assert resident_bytes(kept) - weights < 0.01 * weights  # RoPE tables, expert loads, the hash tables' int64
    assert resident_bytes(kept) < 0.6 * resident_bytes(plain)
    flash = weight_bytes(preset("v4-flash"))
    assert 0.26 < flash["released"] / flash["bf16"] < 0.3
    assert 155e9 < flash["released"] < 165e9  # the published release: ~160 GB


def test_fp4_nibbles_are_deepseeks():
    """Element 2j in the low nibble, 2j+1 in the high one, E2M1 with the sign in bit 3; a ue8m0 scale per 32."""
    packed = torch.tensor([[0x21, 0xF7] + [0] * 14], dtype=torch.uint8).view(torch.int8)
    assert unpack_fp4(packed)[0, :4].tolist() == [0.5, 1.0, 6.0, -6.0]
    scale = torch.tensor([[0.25]]).to(torch.float8_e8m0fnu)
    assert dequantize_fp4(packed, scale)[0, :4].tolist() == [0.125, 0.25, 1.5, -1.5]
    w = torch.randn(8, 64)
    q, s = quantize_fp4(w)
    back = dequantize_fp4(q, s)
    assert ((back - w).abs() <= s.float().repeat_interleave(32, -1) * 1.0 + 1e-7).all()  # half the top step, 2·s


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, r"quantization_config\.fmt"),
        ({"quantization_config": {"quant_method": "awq"}}, r"quantization_config\.quant_method"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [1, 128]}}, "weight_block_size"),
        ({"expert_dtype": "fp2"}, "expert_dtype"),
        ({"quantization_config": {"quant_method": "fp8", "group_size": 64}}, r"quantization_config\.group_size"),
        ({"expert_dtype": "fp8"}, "int8 .FP4"),  # FP4 files announced as FP8 experts
    ],
)
def test_quantization_nanoseek_does_not_implement_is_refused_naming_the_field(release, tmp_path, change, message):
    _, path = release
    raw = json.loads((path / "config.json").read_text())
    if "quantization_config" in change:
        raw["quantization_config"] = change["quantization_config"] | {"scale_fmt": "ue8m0"}
    raw |= {k: v for k, v in change.items() if k != "quantization_config"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file(load_file(path / "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        nanoseek.load_pretrained(tmp_path, quantized=True)


def test_served_in_bf16_kept_quantized_is_as_close_to_fp32_as_the_bf16_forward(tmp_path):
    """What a GPU runs: the release kept quantized in bf16, served by the engine at DeepSeek's geometry (64-token
    blocks, HCA's 128-token windows spanning two, prompts chunked by a 96-token budget, decode rows together). Every
    step's logprobs are no further from the fp32 forward's than the bf16 full forward's are (the fp32 bias of the
    compressor's gate, KeepsDtype, goes into the bf16 cache)."""
    from nanoseek.infer.engine import Engine, EngineConfig
    from nanoseek.infer.request import SamplingParams

    config = _config().replace(initializer_range=0.05)
    nanoseek.save_pretrained(_randomized(config).to(torch.bfloat16), tmp_path, fp8=True)
    served = nanoseek.load_pretrained(tmp_path, dtype=torch.bfloat16, quantized=True).eval()
    exact = nanoseek.load_pretrained(tmp_path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in (150, 70, 200)]
    engine = Engine(served, config=EngineConfig(block_size=64, max_seqs=3, token_budget=96))
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=8, min_tokens=8, logprobs=20))
    engine_off, forward_off = [], []
    for prompt, completion in zip(prompts, completions):
        assert completion.finish_reason == "length" and len(completion.logprobs) == 8
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            bf16, fp32 = (m(ids)[0].float().log_softmax(-1) for m in (served, exact))
        for k, entry in enumerate(completion.logprobs):
            position, top = len(prompt) - 1 + k, torch.tensor([i for i, _ in entry.top])
            got = torch.tensor([v for _, v in entry.top])
            engine_off.append((got - fp32[position, top]).abs().max().item())
            forward_off.append((bf16[position, top] - fp32[position, top]).abs().max().item())
    assert max(engine_off) <= 1.25 * max(forward_off), (max(engine_off), max(forward_off))
    assert sorted(engine_off)[len(engine_off) // 2] <= 1.25 * sorted(forward_off)[len(forward_off) // 2]
