"""`nanoseek bench` and the dense baseline it is compared with: same trainer, Llama layout, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.errors import NanoseekError
from nanoseek.flops import model_stats
from nanoseek.infer.engine import Engine


@pytest.mark.slow  # 95 s on the 2-core machine, 75 of them torch.compile's first compilation of the blocks
def test_bench_compares_with_transformers(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "tiny",
                "--batch",
                "2",
                "--seq",
                "32",
                "--steps",
                "1",
                "--new-tokens",
                "4",
                "--out",
                str(tmp_path),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "bench.json").read_text())
    training = result["training"]
    for side in ("nanoseek_eager", "nanoseek", "transformers"):  # eager = the loop before compile + fused AdamW
        assert training[f"{side}_tokens_per_s"] > 0 and 0 < training[f"{side}_mfu"] < 2
    assert (
        training["flops_per_token"]
        == model_stats(nanoseek.preset("tiny").replace(num_nextn_predict_layers=0), seq_len=32).flops_per_token
    )
    decode = result["decoding"]["batch_16"]
    assert decode["sequences"] == 16 and decode["identical_sequences"] >= 15  # greedy on the same weights
    long_context = result["decoding"]["long_context_batch_8"]  # the tiny preset's whole context
    assert long_context["prompt_tokens"] == 252 and long_context["identical_sequences"] >= 7
    v3 = result["kv_cache_bytes_per_token"]["DeepSeek-V3 shape"]
    assert v3["MLA"] == 576 * 61 * 2 and v3["MHA"] == 2 * 128 * 128 * 61 * 2 and v3["GQA"] == 2 * 16 * 128 * 61 * 2
    markdown = (tmp_path / "bench.md").read_text()
    assert "| training tok/s" in markdown and "| DeepSeek-V3 shape | 70,272 |" in markdown
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_dense_baseline_trains_with_the_same_trainer(tmp_path, monkeypatch):
    import transformers
    from test_train import _corpus_lines

    from nanoseek.train.config import TrainConfig
    from nanoseek.train.trainer import RunSpec, train

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("\n".join(_corpus_lines()))
    config = nanoseek.preset("tiny-dense").replace(
        hidden_size=64, intermediate_size=128, head_dim=16, max_position_embeddings=64
    )
    cfg = TrainConfig(
        seq_len=32,
        batch_size=4,
        max_steps=30,
        warmup_steps=5,
        eval_every=30,
        eval_batches=2,
        save_every=30,
        vocab_size=300,
    )
    summary = train(RunSpec(tmp_path / "dense", config, cfg, str(tmp_path / "corpus.txt")), show_progress=False)
    assert summary["val_loss"] < 5.0  # uniform over 300 tokens is 5.7
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(NanoseekError, match="latent cache"):
        Engine(nanoseek.load_pretrained(tmp_path / "dense"))
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ours = nanoseek.load_pretrained(tmp_path / "dense")(ids)
        assert (ours - model(ids).logits).abs().max().item() < 1e-4
