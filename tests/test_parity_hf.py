"""The executable spec of the architecture: nanoseek equals transformers' DeepSeek-V3/V2 on the same weights."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from helpers import YARN, assert_logits_match, hf_model, randomize_, tiny_config, tiny_dense_config

CASES = {
    "v3-qlora-groups": dict(),
    "no-qlora": dict(q_lora_rank=None),
    "yarn": dict(rope_scaling=YARN),
    "dense-first-0": dict(first_k_dense_replace=0, n_group=4, topk_group=2),
    "dense-first-2-tied": dict(first_k_dense_replace=2, tie_word_embeddings=True),
    "no-shared-no-norm": dict(n_shared_experts=0, norm_topk_prob=False, routed_scaling_factor=1.0),
    "v2-lite-softmax": dict(
        q_lora_rank=None,
        scoring_func="softmax",
        norm_topk_prob=False,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        n_shared_experts=2,
        num_experts_per_tok=3,
        rope_scaling=YARN.__class__(
            factor=4.0, original_max_position_embeddings=32, mscale=0.707, mscale_all_dim=0.707
        ),
    ),
    "v2-softmax-groups": dict(
        scoring_func="softmax", norm_topk_prob=False, n_group=4, topk_group=2, routed_scaling_factor=1.0
    ),
}


def _inputs(config, batch=2, length=24, seed=1):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_transformers_saved_loads_equal(case, tmp_path):
    config = tiny_config(**CASES[case])
    reference = hf_model(config)
    reference.save_pretrained(tmp_path)
    ours = nanoseek.load_pretrained(tmp_path).eval()
    ids = _inputs(config)
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (2, 24, config.vocab_size)
    assert_logits_match(got, expected)


@pytest.mark.parametrize("case", ["v3-qlora-groups", "no-qlora", "yarn", "dense-first-2-tied", "v2-lite-softmax"])
def test_nanoseek_saved_loads_in_transformers(case, tmp_path):
    import transformers

    config = tiny_config(**CASES[case], num_nextn_predict_layers=1)
    torch.manual_seed(3)
    ours = randomize_(nanoseek.build_model(config).eval())
    if config.scoring_func != "sigmoid":  # transformers' V2 (softmax) has no correction bias: leave it at 0
        for moe in ours.moe_layers():
            moe.router.expert_bias.zero_()
    nanoseek.save_pretrained(ours, tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _inputs(config)
    with torch.no_grad():
        assert_logits_match(ours(ids), reference(ids).logits)
    # and back: the MTP module survives the round trip too
    again = nanoseek.load_pretrained(tmp_path)
    assert again.config == config
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_dense_gqa_baseline_matches_transformers_llama(tmp_path):
    """The dense baseline of the compute study is a Llama: saved in Llama's layout (RoPE rows reordered), it gives
    transformers' LlamaForCausalLM the same logits, and it loads back unchanged."""
    import transformers

    config = tiny_dense_config()
    torch.manual_seed(5)
    ours = nanoseek.build_model(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.normal_(1.0, 0.2) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    nanoseek.save_pretrained(ours, tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reference).__name__ == "LlamaForCausalLM"
    ids = _inputs(config)
    with torch.no_grad():
        assert_logits_match(ours(ids), reference(ids).logits)
    again = nanoseek.load_pretrained(tmp_path)
    assert again.config.to_hf_dict() == config.to_hf_dict()
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_mtp_concatenates_the_next_tokens_embedding_before_the_hidden_state():
    """V3's MTP module (§2.2) in the order of DeepSeek's released `eh_proj` (vLLM's and SGLang's DeepSeek MTP:
    eh_proj(cat([enorm(embeds), hnorm(previous_hidden)]))), written out by hand with eh_proj's two column halves:
    position i sees h_i and Emb(t_{i+1}), and its loss is the cross-entropy of head(norm(block(·))) against t_{i+2}.
    transformers has no MTP to compare with."""
    import torch.nn.functional as F

    config = tiny_config(num_nextn_predict_layers=1)
    torch.manual_seed(4)
    model = randomize_(nanoseek.build_model(config).eval())
    mtp, d = model.mtp[0], config.hidden_size
    seen = {}
    model.layers[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("h", out))
    mtp.block.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    mtp.block.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))
    ids = _inputs(config)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        mtp_loss = model(ids, targets).mtp_loss
        embedding_half, hidden_half = mtp.eh_proj.weight[:, :d], mtp.eh_proj.weight[:, d:]
        x = F.linear(mtp.enorm(model.embed(ids[:, 1:])), embedding_half) + F.linear(
            mtp.hnorm(seen["h"][:, :-1]), hidden_half
        )
        logits = model.head(mtp.norm(seen["out"]))
    assert (seen["x"] - x).abs().max().item() <= 1e-5
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    assert abs(mtp_loss.item() - expected.item()) <= 1e-5
