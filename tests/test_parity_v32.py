"""DeepSeek-V3.2 (DeepSeek Sparse Attention) against transformers' DeepseekV32ForCausalLM on the same weights: the
lightning indexer picks the same tokens, and the logits agree, loaded both ways."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from helpers import V32, YARN, assert_logits_match, hf_model, tiny_config
from nanoseek.models.deepseek_v32.indexer import top_k_mask

CASES = {
    "v32": dict(),
    "v32-yarn-dense-first-0": dict(rope_scaling=YARN, first_k_dense_replace=0),
    "v32-topk-beyond-length": dict(index_topk=64),
}


def _ids(config, length=24):
    return torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))


def _selections(model, layer_names: list[str]) -> dict[str, torch.Tensor]:
    """Each indexer's top-k choice per query, recorded by a forward hook (as sorted index sets)."""
    chosen = {}

    def hook(name):
        def record(module, args, output):
            chosen[name] = output.long().sort(dim=-1).values if output.dtype != torch.bool else output

        return record

    for name in layer_names:
        model.get_submodule(name).register_forward_hook(hook(name))
    return chosen


@pytest.mark.parametrize("case", CASES)
def test_v32_equals_transformers_both_ways(case, tmp_path):
    config = tiny_config(**{**V32, **CASES[case]})
    reference = hf_model(config)
    reference.save_pretrained(tmp_path / "hf")
    ours = nanoseek.load_pretrained(tmp_path / "hf").eval()
    ids = _ids(config)
    theirs = _selections(reference, [f"model.layers.{i}.self_attn.indexer" for i in range(3)])
    with torch.no_grad():
        expected = reference(ids).logits
        # ours: each layer's index scores, turned into the mask it attends with; theirs: the top-k indices
        scores = {}
        for i, layer in enumerate(ours.layers):
            layer.attn.indexer.register_forward_hook(lambda m, a, out, i=i: scores.__setitem__(i, out))
        got = ours(ids)
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    visible = {i: top_k_mask(scores[i], causal.expand(2, 24, 24), config.index_topk) for i in range(3)}
    for i in range(3):
        picked = (
            torch.zeros(2, 24, 24, dtype=torch.bool).scatter_(-1, theirs[f"model.layers.{i}.self_attn.indexer"], True)
            & causal
        )
        assert torch.equal(visible[i], picked), i  # the same tokens, before any logit is compared
    if config.index_topk < 24:  # top-k dropped tokens a query could see: the test exercises the sparsity
        assert (visible[0].sum(-1) < causal.sum(-1)).any()
    assert_logits_match(got, expected)
    nanoseek.save_pretrained(ours, tmp_path / "ours")
    again = type(reference).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_logits_match(again(ids).logits, expected)


def test_served_v32_greedy_equals_transformers_generate(tmp_path):
    """The engine over the paged store (indexer keys beside the latents, top-k gathered at decode), batched, in
    small blocks so the second prompt takes the first one's cached prefix: the tokens of transformers' generate."""
    from nanoseek.infer.engine import Engine, EngineConfig
    from nanoseek.infer.request import SamplingParams

    config = tiny_config(**V32)
    reference = hf_model(config)
    reference.save_pretrained(tmp_path / "hf")
    engine = Engine(nanoseek.load_pretrained(tmp_path / "hf"), config=EngineConfig(block_size=4, token_budget=16))
    first = _ids(config, 21)[0].tolist()
    prompts = [first, first[:12] + [5, 6, 7]]
    served = [engine.generate([prompt], SamplingParams(max_new_tokens=14))[0] for prompt in prompts]
    assert served[1].cached_tokens == 8  # two blocks of the shared 12 tokens (the third's next token differs)
    for prompt, result in zip(prompts, served):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, min_new_tokens=14)
        assert result.token_ids == expected[0, len(prompt) :].tolist()


def test_v32_speculation_equals_plain_greedy():
    """The MTP module's drafts verified two tokens a step, each with its own top-k: the tokens of plain decoding."""
    from nanoseek.infer.engine import Engine, EngineConfig
    from nanoseek.infer.request import SamplingParams

    torch.manual_seed(0)
    model = nanoseek.build_model(tiny_config(num_nextn_predict_layers=1, **V32)).eval()
    with torch.no_grad():  # peaky logits, so greedy drafts are often accepted
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.15)
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (7, 19)]
    params = SamplingParams(max_new_tokens=30)
    plain = Engine(model, config=EngineConfig(speculation=False)).generate(prompts, params)
    speculating = Engine(model, config=EngineConfig(block_size=8, token_budget=16))
    assert [r.token_ids for r in speculating.generate(prompts, params)] == [r.token_ids for r in plain]
    assert speculating.accepted > 0


def test_post_training_keeps_training_the_indexers(tmp_path):
    """SFT and GRPO on a V3.2 model run DSA's sparse stage: top-k attention (rollouts served sparse), the indexers
    learning from their KL beside the task's loss, which each logs."""
    import json

    from safetensors.torch import load_file

    from nanoseek.cli import main
    from nanoseek.data.tokenizer import train_tokenizer

    base = tmp_path / "base"
    tokenizer = train_tokenizer(["What is 12 + 30? The answer is 42. Be brief, my lord; and again. "] * 50, 200)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=128, **V32)
    nanoseek.save_pretrained(nanoseek.build_model(config), base)
    tokenizer.save(str(base / "tokenizer.json"))
    assert (
        main(
            [
                "sft",
                str(base),
                "--task",
                "arithmetic",
                "--task-examples",
                "20",
                "--out",
                str(tmp_path / "sft"),
                "--max-steps",
                "2",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    # a reward the random model meets in some samples only: GRPO skips groups whose samples all earn the same
    assert (
        main(
            [
                "rl",
                str(tmp_path / "sft"),
                "--task",
                "helpers:EvenLength",
                "--out",
                str(tmp_path / "rl"),
                "--batch-size",
                "2",
                "--group-size",
                "4",
                "--max-response-tokens",
                "4",
                "--max-steps",
                "1",
            ]
        )
        == 0
    )
    for run in ("sft", "rl"):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(row["indexer_kl"] > 0 for row in rows), run
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "sft" / "model.safetensors")
    indexer = [k for k in before if ".indexer.wk." in k]
    assert indexer and all(not torch.equal(before[k], after[k]) for k in indexer)
