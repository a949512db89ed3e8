"""DeepSeek-V4 against transformers' DeepseekV4ForCausalLM on the same weights: every parameter transformers starts
at zero randomized (sinks, compressor position biases, hyper-connection biases, correction biases, hash tables),
sequences past the window and over many compressed entries, the CSA indexer dropping some; loaded both ways, from
DeepSeek's release names too; config.json both ways."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from helpers import release_name_pattern
from nanoseek.config import DeepseekV4Config, ModelConfig
from nanoseek.errors import ConfigError
from nanoseek.models.deepseek_v4.compressor import entries_visible
from nanoseek.models.deepseek_v4.config import CSA, HCA, SLIDING
from nanoseek.presets import preset

LENGTH = 24  # > the window (6), 12 CSA entries of 2 tokens (top 3 kept), 6 HCA entries of 4


def v4_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=8,
        qk_rope_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        routed_scaling_factor=1.5,
        scoring_func="sqrtsoftplus",
        max_position_embeddings=64,
        head_dim=16,
        layer_types=(SLIDING, CSA, HCA, CSA),
        mlp_layer_types=("hash_moe", "moe", "moe", "moe"),
        sliding_window=6,
        compress_rate_csa=2,
        compress_rate_hca=4,
        hc_mult=3,
        hc_sinkhorn_iters=5,
        o_groups=2,
        o_lora_rank=8,
        swiglu_limit=1.5,
        index_n_heads=4,
        index_head_dim=8,
        index_topk=3,
        initializer_range=0.2,
    )
    return DeepseekV4Config(**fields).replace(**overrides)


def v4_hf_model(config: ModelConfig, seed: int = 0):
    """transformers' model of `config`, with every parameter and buffer random (none left at its zero init)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.endswith("position_bias"):  # norms around 1, the rest around 0
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))
            else:
                p.normal_(0, config.initializer_range)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], config.n_routed_experts).argsort(dim=1)[:, : b.shape[1]])
            elif name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model


def _ids(config: ModelConfig, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))


def _record(model, names: list[str]) -> dict[str, torch.Tensor]:
    outputs = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    return outputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """transformers' V4 model (YaRN on the compressed layers) saved by save_pretrained, and its logits."""
    config = v4_config(rope_scaling={"factor": 4.0, "original_max_position_embeddings": 16})
    reference = v4_hf_model(config)
    path = tmp_path_factory.mktemp("v4") / "hf"
    reference.save_pretrained(path)
    csa = [i for i, t in enumerate(config.layer_types) if t == CSA]
    picks = _record(reference, [f"model.layers.{i}.self_attn.compressor.indexer" for i in csa])
    with torch.no_grad():
        logits = reference(_ids(config)).logits
    return config, reference, path, logits, {i: picks[f"model.layers.{i}.self_attn.compressor.indexer"] for i in csa}


def test_v4_equals_transformers_both_ways(saved, tmp_path):
    config, reference, path, expected, their_picks = saved
    ours = nanoseek.load_pretrained(path).eval()
    assert ours.config == config
    ours_picks = _record(ours, [f"layers.{i}.attn.indexer" for i in their_picks])
    ids = _ids(config)
    with torch.no_grad():
        got = ours(ids)
    for i, indices in their_picks.items():  # the same entries, before any logit is compared
        scores = ours_picks[f"layers.{i}.attn.indexer"]
        readable = entries_visible(torch.arange(LENGTH), scores.shape[-1], config.compress_rate_csa)
        picked = ours.layers[i].attn.indexer.select(scores, readable.expand_as(scores))
        theirs = torch.zeros(*picked.shape[:2], picked.shape[2] + 1, dtype=torch.bool)
        theirs = theirs.scatter_(-1, indices.where(indices >= 0, picked.shape[2]), True)[..., :-1]
        assert torch.equal(picked, theirs), i
        assert (picked.sum(-1) < torch.arange(LENGTH).add(1).div(2, rounding_mode="floor")).any()  # top-k dropped
    assert (got - expected).abs().max().item() <= 1e-5
    # with autograd the hyper-connections' Sinkhorn runs out of place (without, in place): both are transformers'
    assert (ours(ids).detach() - expected).abs().max().item() <= 1e-5
    with torch.no_grad():  # the indexer's choice matters: attending every entry gives other logits
        for i in their_picks:
            ours.layers[i].attn.indexer.topk = 10**6
        assert (ours(ids) - expected).abs().max().item() > 1e-3
        for i in their_picks:
            ours.layers[i].attn.indexer.topk = config.index_topk
    nanoseek.save_pretrained(ours, tmp_path / "ours")
    again = type(reference).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(ids).logits - expected).abs().max().item() <= 1e-5


def test_v4_loads_deepseek_release_names(saved, tmp_path):
    """DeepSeek's own layout: no `model.` prefix, embed/norm/hc_head_* at the top, and the release config form
    (compress_ratios per layer, num_hash_layers, rope_scaling)."""
    config, _, path, expected, _ = saved
    released = _release_names(load_file(path / "model.safetensors"))
    assert "head.weight" in released and "layers.0.attn.wq_a.weight" in released
    (tmp_path / "release").mkdir()
    save_file(released, tmp_path / "release" / "model.safetensors")
    raw = config.to_hf_dict("deepseek")
    assert "layer_types" not in raw and raw["num_hash_layers"] == 1
    (tmp_path / "release" / "config.json").write_text(json.dumps(raw))
    ours = nanoseek.load_pretrained(tmp_path / "release").eval()
    assert ours.config == config
    with torch.no_grad():
        assert (ours(_ids(config)) - expected).abs().max().item() <= 1e-5


def test_v4_config_json_both_ways():
    from transformers import DeepseekV4Config

    config = preset("v4-flash")
    for style in ("transformers", "deepseek"):
        assert ModelConfig.from_hf_dict(config.to_hf_dict(style)) == config, style
    theirs = DeepseekV4Config(**config.to_hf_dict())
    assert list(theirs.layer_types) == list(config.layer_types)
    assert theirs.qk_rope_head_dim == config.qk_rope_head_dim and theirs.mlp_layer_types[:4] == ["hash_moe"] * 3 + [
        "moe"
    ]
    assert theirs.rope_parameters["compress"]["factor"] == 16.0
    assert ModelConfig.from_hf_dict(json.loads(theirs.to_json_string())) == config  # transformers' own file


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(layer_types=(SLIDING, CSA)), "one entry per layer"),
        (dict(mlp_layer_types=("moe", "moe", "moe", "dense")), "must be one of"),
        (dict(index_n_heads=0), "lightning indexer"),
        (dict(num_attention_heads=3), "o_groups"),
        (dict(first_k_dense_replace=1), "unknown config field 'first_k_dense_replace'"),  # every V4 layer is MoE
        (dict(head_dim=4), "RoPE dims"),
    ],
)
def test_v4_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        v4_config(**change)


def test_v4_release_config_with_a_compressed_mtp_layer_is_refused():
    raw = v4_config(num_nextn_predict_layers=1).to_hf_dict("deepseek")
    assert raw["compress_ratios"][-1] == 0  # the MTP layer's entry, as DeepSeek's releases have it
    raw["compress_ratios"][-1] = 2
    with pytest.raises(ConfigError, match="MTP layers slide"):
        ModelConfig.from_hf_dict(raw)


def _randomized(config: ModelConfig, seed: int = 0):
    """nanoseek's model of `config` with every parameter random (norms around 1), the zero-initialized ones too."""
    torch.manual_seed(seed)
    model = nanoseek.build_model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.endswith("position_bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
        for router in [layer.mlp.router for layer in [*model.layers, *(m.block for m in model.mtp)]]:
            if hasattr(router, "expert_bias"):
                router.expert_bias.normal_(0, 0.1)
    return model


def _release_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' save form → DeepSeek's release names (no `model.` prefix, top-level embed/norm/hc_head_*, the
    attention's norm `kv_norm`), each one a name of V4-Flash's release list (tests/fixtures/releases)."""
    top = {
        "model.embed_tokens.weight": "embed.weight",
        "model.norm.weight": "norm.weight",
        "model.hc_head.hc_fn": "hc_head_fn",
        "model.hc_head.hc_base": "hc_head_base",
        "model.hc_head.hc_scale": "hc_head_scale",
    }
    renamed = {
        top.get(k, k.removeprefix("model.").replace(".attn.norm.", ".attn.kv_norm.")): v for k, v in tensors.items()
    }
    release = release_name_pattern("deepseek-v4-flash")
    assert all(release.fullmatch(k) for k in renamed), [k for k in renamed if not release.fullmatch(k)][:3]
    return renamed


def test_v4_mtp_is_deepseeks_and_loads_from_both_layouts(tmp_path):
    """V4's MTP depth (DeepSeek's MTPBlock): e_proj(enorm(Emb(t_{i+1}))) added to h_proj(hnorm(streams_i)) of every
    stream, a sliding block, its own stream collapse, norm, the shared head; its loss predicts t_{i+2}. Saved as
    `model.mtp.0.…` (transformers loads the file and skips them, giving the same logits); DeepSeek's `mtp.0.…`
    release names load to the same loss."""
    import torch.nn.functional as F
    from transformers import DeepseekV4ForCausalLM

    config = v4_config(num_nextn_predict_layers=1)
    ours = _randomized(config)
    mtp = ours.mtp[0]
    assert mtp.block.attn.compressor is None and not hasattr(mtp.block.mlp.router, "tid2eid")
    ids = _ids(config)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        out = ours(ids, targets)
        positions = torch.arange(LENGTH)
        streams = ours._hyper_layers(ours.embed(ids), positions, ids)
        x = mtp.e_proj(mtp.enorm(ours.embed(ids[:, 1:]))).unsqueeze(2) + mtp.h_proj(mtp.hnorm(streams[:, :-1]))
        x = mtp.block(x, ours._ropes(), positions[:-1], ids[:, 1:])
        logits = ours.head(mtp.norm(mtp.hc_head(x)))
        expected = F.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100)
        assert (out.mtp_loss - expected).abs().item() <= 1e-5 and out.mtp_loss > 0
        assert torch.equal(ours.mtp_logits(x), logits)
    nanoseek.save_pretrained(ours, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "model.safetensors")
    assert "model.mtp.0.e_proj.weight" in tensors and "model.mtp.0.hc_head_fn" in tensors
    theirs = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    (tmp_path / "release").mkdir()
    save_file(_release_names(tensors), tmp_path / "release" / "model.safetensors")
    (tmp_path / "release" / "config.json").write_text(json.dumps(config.to_hf_dict("deepseek")))
    with torch.no_grad():
        assert (theirs(ids).logits - out.logits).abs().max().item() <= 1e-5
        for path in ("ours", "release"):
            again = nanoseek.load_pretrained(tmp_path / path).eval()
            assert again.config == config
            assert (again(ids, targets).mtp_loss - out.mtp_loss).abs().item() <= 1e-6, path


def test_v4_presets_published_sizes():
    """V4-Flash 284B total / 13B active, V4-Pro 1.6T / 49B; at 1M tokens V4-Flash needs a fraction of V3.2's
    per-token FLOPs and cache (DeepSeek: ~10 % and ~7 %)."""
    from nanoseek.flops import long_context, model_stats

    flash, pro = model_stats(preset("v4-flash")), model_stats(preset("v4-pro"))
    assert round(flash.total_params / 1e9) == 284 and round(flash.active_params / 1e9) == 13
    assert round(pro.total_params / 1e11) == 16 and round(pro.active_params / 1e9) == 49
    v4, v32 = long_context(preset("v4-flash"))[-1], long_context(preset("v32"))[-1]
    assert v4["context"] == 2**20
    assert 0.05 < v4["flops_per_token"] / v32["flops_per_token"] < 0.15
    assert 0.05 < v4["cache_bytes_per_token"] / v32["cache_bytes_per_token"] < 0.10


def test_v4_cached_decode_equals_the_full_forward_and_transformers_generate(tmp_path):
    """The state a V4 layer carries between chunks (window keys, compressors' open windows and overlap, entries):
    token by token, and in uneven chunks, the logits of the full forward; greedy tokens those of transformers'
    generate with its own cache. 16 indexer heads: with few, an entry often scores exactly 0 (every ReLU off),
    and which of several tied entries top-k keeps depends on how many entries there are."""
    from nanoseek.models.deepseek_v4.model import HybridCache

    config = v4_config(index_n_heads=16, rope_scaling={"factor": 4.0, "original_max_position_embeddings": 16})
    reference = v4_hf_model(config, seed=3)
    reference.save_pretrained(tmp_path)
    ours = nanoseek.load_pretrained(tmp_path).eval()
    ids = _ids(config, 30)
    with torch.no_grad():
        full = ours(ids)
        for chunks in ([1] * 30, [5, 3, 1, 7, 2, 12]):
            cache, outs, start = HybridCache(), [], 0
            for size in chunks:
                outs.append(ours.forward_cached(ids[:, start : start + size], cache))
                start += size
            assert (torch.cat(outs, dim=1) - full).abs().max().item() <= 1e-5, chunks
        assert cache.layers[0].keys.shape[1] == config.sliding_window - 1  # the window stays bounded
        prompt = ids[:, :11]
        expected = reference.generate(prompt, max_new_tokens=14, do_sample=False, min_new_tokens=14)
        cache, tokens = HybridCache(), prompt
        logits = ours.forward_cached(prompt, cache)
        for _ in range(14):
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
            logits = ours.forward_cached(tokens[:, -1:], cache)
    assert torch.equal(tokens, expected)


def test_v4_served_greedy_equals_transformers_generate(tmp_path):
    """The engine over V4's store (entries in the sequences' blocks, windows and open compressor windows in a
    state slot per running sequence): prompts of several lengths, prefill in chunks of the step's token budget,
    more prompts than running slots; the same prompts again, and each prompt followed by its 20 tokens (a next
    turn), resumed from the prefix cache: its blocks, and the state snapshot after the prompt's last full block
    (taken in prefill) or the output's (taken in decode); then a cache so small that sequences are preempted and
    recomputed. Every sequence's greedy tokens are transformers' generate's."""
    from nanoseek.infer.engine import Engine, EngineConfig
    from nanoseek.infer.request import SamplingParams

    config = v4_config(index_n_heads=16, max_position_embeddings=128)
    reference = v4_hf_model(config, seed=3)
    reference.save_pretrained(tmp_path)
    ours = nanoseek.load_pretrained(tmp_path).eval()
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 64, (n,), generator=generator).tolist() for n in (11, 25, 3, 40)]
    with torch.no_grad():
        expected = [
            reference.generate(torch.tensor([p]), max_new_tokens=30, min_new_tokens=30, do_sample=False)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    roomy = Engine(ours, config=EngineConfig(block_size=8, max_seqs=3, token_budget=16, state_snapshots=16))
    first = roomy.generate(prompts, params)
    assert [c.token_ids for c in first] == [e[:20] for e in expected] and not any(c.cached_tokens for c in first)
    again = roomy.generate(prompts, params)
    assert [c.token_ids for c in again] == [e[:20] for e in expected]
    assert [c.cached_tokens for c in again] == [(len(p) - 1) // 8 * 8 for p in prompts]
    turns = [p + e[:20] for p, e in zip(prompts, expected)]
    extended = roomy.generate(turns, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert [c.token_ids for c in extended] == [e[20:] for e in expected]
    assert [c.cached_tokens for c in extended] == [(len(t) - 1) // 8 * 8 for t in turns]
    plain = EngineConfig(block_size=8, max_seqs=3, token_budget=16)  # 9 state slots (3 running, 6 snapshots)
    tight = Engine(
        ours,
        config=dataclasses.replace(  # the 9 states and 10 blocks: a sequence needs up to 8
            plain, cache_memory=int(Engine(ours, config=plain).cache_bytes * 0.54)
        ),
    )
    assert [c.token_ids for c in tight.generate(prompts, params)] == [e[:20] for e in expected]
    assert tight.stats()["preemptions"] > 0
