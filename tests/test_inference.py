"""Inference: absorbed-MLA decode equals the full forward; batching has no cross-talk; MTP speculation is exact."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from helpers import YARN, tiny_config
from nanoseek.infer.cache import LatentCache
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.speculative import speculative_greedy


def _model(**overrides) -> nanoseek.Transformer:
    torch.manual_seed(0)
    model = nanoseek.Transformer(tiny_config(num_nextn_predict_layers=1, **overrides)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init give peaky, varied logits
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.15)
    return model


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=None, rope_scaling=YARN),
                                       dict(scoring_func="softmax", norm_topk_prob=False)])
def test_prefill_then_decode_equals_full_forward(overrides):
    model = _model(**overrides)
    ids = torch.randint(0, 96, (2, 24))
    cache = LatentCache(model.config, 2, 32)
    with torch.no_grad():
        full = model(ids)
        steps = [model.forward_cached(ids[:, :9], torch.arange(9).expand(2, -1), cache)[0]]
        for t in range(9, 24):
            steps.append(model.forward_cached(ids[:, t: t + 1], torch.full((2, 1), t), cache)[0])
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_cache_holds_only_latent_and_rope_key():
    config = tiny_config()
    cache = LatentCache(config, batch_size=3, max_len=50)
    assert cache.bytes_per_token() == (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * 4
    assert cache.latent.numel() + cache.k_rope.numel() == 3 * 50 * config.num_hidden_layers * (16 + 4)
    v3 = nanoseek.ModelConfig.preset("v3")
    assert (v3.kv_lora_rank + v3.qk_rope_head_dim) == 576


def test_batch_has_no_cross_talk():
    model = _model()
    engine = Engine(model)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]
    params = SamplingParams(max_new_tokens=12)
    batched = engine.generate(prompts, params)
    for prompt, result in zip(prompts, batched):
        alone = engine.generate([prompt], params)[0]
        assert result.token_ids == alone.token_ids and len(alone.token_ids) == 12
        # and plain greedy by full recomputation agrees
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert ids[len(prompt):] == result.token_ids


def test_sampling_is_seeded_and_stops():
    engine = Engine(_model(), decode=lambda ids: "".join(chr(97 + i % 26) for i in ids))
    sampled = [engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, seed=s))[0]
               for s in (0, 0, 1)]
    assert sampled[0].token_ids == sampled[1].token_ids != sampled[2].token_ids
    greedy = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20))[0]
    stop_id = greedy.token_ids[5]
    cut = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20, stop_token_ids=(stop_id,)))[0]
    first = greedy.token_ids.index(stop_id)
    assert cut.token_ids == greedy.token_ids[:first] and cut.finish_reason == "stop"
    stop_text = greedy.text[7:9]
    streamed: list[str] = []
    by_string = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20, stop_strings=(stop_text,)),
                                on_token=lambda row, delta, done: streamed.append(delta))[0]
    assert by_string.text == greedy.text[: greedy.text.index(stop_text)] == "".join(streamed)
    assert by_string.finish_reason == "stop" and greedy.finish_reason == "length"


def test_too_long_prompt_is_refused():
    engine = Engine(_model())
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.generate([[1] * 120], SamplingParams(max_new_tokens=20))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mtp_speculation_equals_greedy(seed):
    torch.manual_seed(seed)
    model = _model()
    prompt = torch.randint(0, 96, (7,)).tolist()
    plain = Engine(model).generate([prompt], SamplingParams(max_new_tokens=40))[0].token_ids
    result = speculative_greedy(model, prompt, max_new_tokens=40)
    assert result.token_ids == plain
    assert result.main_forwards < 40 and result.drafted == result.main_forwards
    assert result.main_forwards == 40 - 1 - result.accepted or result.main_forwards == 40 - result.accepted
