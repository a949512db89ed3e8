"""DeepSeek-V3.2 (DeepSeek Sparse Attention) against transformers' DeepseekV32ForCausalLM on the same weights: the
lightning indexer picks the same tokens, and the logits agree, loaded both ways."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from helpers import YARN, hf_model, tiny_config

# 8 indexer heads: with few heads, ReLU zeros every head's score for many keys, and ties make top-k arbitrary
V32 = dict(index_n_heads=8, index_head_dim=8, index_topk=6)
CASES = {"v32": dict(), "v32-yarn-dense-first-0": dict(rope_scaling=YARN, first_k_dense_replace=0),
         "v32-topk-beyond-length": dict(index_topk=64)}


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
        # ours: the mask each layer attends with; theirs: the top-k indices, turned into the same mask
        visible = {}
        for i, layer in enumerate(ours.layers):
            layer.attn.indexer.register_forward_hook(lambda m, a, out, i=i: visible.__setitem__(i, out))
        got = ours(ids)
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    for i in range(3):
        picked = torch.zeros(2, 24, 24, dtype=torch.bool).scatter_(-1, theirs[f"model.layers.{i}.self_attn.indexer"],
                                                                   True) & causal
        assert torch.equal(visible[i][:, 0], picked), i  # the same tokens, before any logit is compared
    if config.index_topk < 24:  # top-k dropped tokens a query could see: the test exercises the sparsity
        assert (visible[0][:, 0].sum(-1) < causal.sum(-1)).any()
    assert (got - expected).abs().max().item() <= 1e-5
    nanoseek.save_pretrained(ours, tmp_path / "ours")
    again = type(reference).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(ids).logits - expected).abs().max().item() <= 1e-5


def test_what_v32_cannot_do_yet_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """Serving (the paged store has no indexer keys yet), pretraining and post-training (no indexer loss yet) stop
    with one line instead of running V3's dense paths or training with a frozen, random indexer."""
    from helpers import micro_model_dir
    from nanoseek.cli import main

    model_dir = micro_model_dir(tmp_path / "model", "to be or not to be\n" * 40, 260, 264)
    config = nanoseek.ModelConfig.load_json(model_dir / "config.json").replace(**V32)
    torch.manual_seed(0)
    nanoseek.save_pretrained(nanoseek.Transformer(config), model_dir)
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question\n" * 300)
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    commands = {"serving": ["generate", str(model_dir), "--prompt", "to be"],
                "training": ["train", "--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "run"),
                             "model.index_n_heads=8", "model.index_head_dim=16", "model.hidden_size=32",
                             "model.num_hidden_layers=1", "train.seq_len=8", "train.vocab_size=260"],
                "post-training": ["sft", str(model_dir), "--out", str(tmp_path / "sft"), "--max-steps", "1"]}
    for what, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nanoseek")]
        assert len(err) == 1 and f"{what} V3.2's sparse attention" in err[0], (what, err)
