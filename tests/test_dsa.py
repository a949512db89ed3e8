"""DeepSeek Sparse Attention's two training stages: the indexer's KL is the KL to its layer's attention, the two
losses reach disjoint parameters, the dense warm-up trains the indexer alone toward attention, and a V3 run becomes
a V3.2 one through `train --from RUN --dsa warmup`, then `--dsa sparse`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train import MICRO_YAML, _corpus_lines

import nanoseek
from helpers import V32, tiny_config
from nanoseek.cli import main
from nanoseek.models.common.terms import ForwardTerms
from nanoseek.train.dsa import configure_indexers


def _model(stage: str, **overrides) -> nanoseek.DeepseekV3Model:
    torch.manual_seed(0)
    model = nanoseek.build_model(tiny_config(**{**V32, **overrides}))
    with torch.no_grad():  # peaked attention and index scores: a KL far from zero
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    configure_indexers(model, stage)
    return model.train()


def _batch(length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 96, (2, length + 1), generator=torch.Generator().manual_seed(3))
    return ids[:, :-1], ids[:, 1:]


def _head_summed_attention(attn, x: torch.Tensor, cos, sin, allowed: torch.Tensor) -> torch.Tensor:
    """p of DSA's loss, written out: each head's softmax over the allowed keys, summed over heads, L1-normalized."""
    q_input, kv_input = attn.compress(x)
    q = torch.cat(attn.queries(q_input, cos, sin), dim=-1)
    k, _ = attn.keys_values(*attn.latents(kv_input, cos, sin))
    logits = (q @ k.transpose(-1, -2)) * attn.softmax_scale  # [B, H, T, T]
    summed = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).sum(1)
    return summed / summed.sum(-1, keepdim=True)


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_indexer_loss_is_the_kl_to_its_layers_attention(stage):
    """The first layer's loss against F.kl_div of the head-summed attention, over every visible token (warm-up) or
    the indexer's top-k (sparse), with 6 of up to 20 tokens kept."""
    model = _model(stage)
    ids, _ = _batch()
    attn = model.layers[0].attn
    inputs = {}
    handle = attn.register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args) and None)
    model(ids)
    handle.remove()
    x, cos, sin = inputs["x"][:3]
    with torch.no_grad():
        scores = attn.indexer(x, attn.q_norm(attn.compress(x)[0]), cos, sin)
        causal = torch.ones(20, 20, dtype=torch.bool).tril().expand(2, 20, 20)
        allowed = causal if stage == "warmup" else nanoseek.models.deepseek_v32.indexer.top_k_mask(scores, causal, 6)
        p = _head_summed_attention(attn, x, cos, sin, allowed)
        log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
        expected = F.kl_div(log_q[allowed], p[allowed], reduction="sum") / (2 * 20)
    terms = ForwardTerms(dsa_stage=stage)
    attn(x, cos, sin, terms=terms)  # this layer alone: its KL is the terms' mean
    assert terms.indexer_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > 0.1
    if stage == "sparse":
        assert (allowed.sum(-1) < causal.sum(-1)).any()


def test_the_two_losses_reach_disjoint_parameters():
    """Sparse training: the LM loss reaches no indexer parameter (the scores only select), and the indexer's KL
    reaches nothing but the indexers (their input is detached)."""
    model = _model("sparse")
    ids, targets = _batch()
    indexers = model.indexers()
    in_indexer = {id(p) for ix in indexers for p in ix.parameters()}
    output = model(ids, targets, with_mtp=False, terms=ForwardTerms(dsa_stage="sparse"))
    kl = output.terms.indexer_loss
    output.lm_loss.backward(retain_graph=True)
    touched = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and not touched & in_indexer
    model.zero_grad(set_to_none=True)
    kl.backward()
    touched = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == in_indexer


def test_dense_warmup_trains_only_the_indexer_toward_attention():
    """Warm-up: attention stays dense (the LM loss is V3's on the same weights), only indexer parameters learn,
    and 40 AdamW steps on one batch cut the KL."""
    model = _model("warmup")
    dense = nanoseek.build_model(tiny_config()).train()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    ids, targets = _batch()
    with torch.no_grad():
        warm = model(ids, targets, terms=ForwardTerms(dsa_stage="warmup"))
        assert warm.lm_loss.item() == pytest.approx(dense(ids, targets).lm_loss.item(), rel=1e-6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kls = []
    for _ in range(40):
        kl = model(ids, targets, terms=ForwardTerms(dsa_stage="warmup")).terms.indexer_loss
        kl.backward()
        optimizer.step()
        optimizer.zero_grad()
        kls.append(kl.item())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) == (".indexer." not in k) for k in after)
    assert kls[-1] < 0.5 * kls[0], kls


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsa")
    (root / "corpus.txt").write_text("\n".join(_corpus_lines()))
    (root / "micro.yaml").write_text(MICRO_YAML.replace("max_steps: 30", "max_steps: 4"))
    return root


def _train(root, out: str, *extra: str) -> int:
    return main(
        [
            "train",
            "--config",
            str(root / "micro.yaml"),
            "--data",
            str(root / "corpus.txt"),
            "--out",
            str(root / out),
            "train.save_every=100",
            "train.eval_every=4",
            *extra,
        ]
    )


def test_v3_run_converts_to_v32_in_two_stages(runs, monkeypatch):
    """`--from` a V3 run with an indexer added and its context doubled by YaRN: the warm-up (at 128 tokens) changes
    nothing but the indexers (the model's tokenizer kept), then sparse training changes everything and logs the
    KL."""
    monkeypatch.setenv("NANOSEEK_CACHE", str(runs / "cache"))
    indexer = ("model.index_n_heads=4", "model.index_head_dim=8", "model.index_topk=8")
    if not (runs / "v3" / "model.safetensors").exists():
        assert _train(runs, "v3") == 0
    assert (
        main(
            [
                "train",
                "--from",
                str(runs / "v3"),
                "--out",
                str(runs / "warm"),
                "--dsa",
                "warmup",
                "--context",
                "128",
                "--data",
                str(runs / "corpus.txt"),
                "--max-steps",
                "4",
                "train.batch_size=2",
                "train.eval_batches=2",
                *indexer,
            ]
        )
        == 0
    )
    extended = json.loads((runs / "warm" / "config.json").read_text())  # YaRN from the parent's 64 tokens
    yarn = extended["rope_parameters"]
    assert extended["max_position_embeddings"] == 128 and yarn["rope_type"] == "yarn" and yarn["factor"] == 2.0
    assert yarn["original_max_position_embeddings"] == 64
    source, warm = load_file(runs / "v3" / "model.safetensors"), load_file(runs / "warm" / "model.safetensors")
    assert all(torch.equal(source[k], warm[k]) for k in source)
    added = [k for k in warm if k not in source]
    assert added and all(".indexer." in k for k in added)
    assert (runs / "warm" / "tokenizer.json").read_text() == (runs / "v3" / "tokenizer.json").read_text()
    assert (
        main(
            [
                "train",
                "--from",
                str(runs / "warm"),
                "--out",
                str(runs / "sparse"),
                "--dsa",
                "sparse",
                "--data",
                str(runs / "corpus.txt"),
                "--max-steps",
                "4",
                "train.seq_len=32",
                "train.batch_size=4",
                "train.eval_batches=2",
            ]
        )
        == 0
    )
    sparse = load_file(runs / "sparse" / "model.safetensors")
    assert all(not torch.equal(warm[k], sparse[k]) for k in warm if k.endswith("proj.weight"))
    rows = [json.loads(line) for line in (runs / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["indexer_kl"] > 0 for row in rows)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dsa", "warmup"], "this model has none: add one with model.index_n_heads"),
        (["--from", "RUNS/v3", "--preset", "tiny"], "--from takes the model's shape from MODEL_DIR"),
        (["--from", "RUNS/nowhere"], "not a model directory"),
        (["--from", "RUNS/v3", "model.hidden_size=64"], "cannot differ"),
        (["--from", "RUNS/v3", "--context", "64"], "does not extend the model's context of 64 tokens"),
    ],
)
def test_bad_conversions_say_why_in_one_line(runs, argv, needle, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(runs / "cache"))
    if not (runs / "v3" / "model.safetensors").exists():
        assert _train(runs, "v3") == 0
    argv = [a.replace("RUNS", str(runs)) for a in argv]
    capsys.readouterr()
    assert (
        main(["train", "--data", str(runs / "corpus.txt"), "--out", str(runs / "bad"), "--max-steps", "1", *argv]) == 2
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_sparse_training_step_under_bf16_autocast():
    """What GPUs run: the same step under bf16 autocast gives the fp32 step's LM loss and indexer KL within bf16
    rounding, the scores and head weights staying fp32."""
    model = _model("sparse")
    ids, targets = _batch()
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            output = model(ids, targets, with_mtp=False, terms=ForwardTerms(dsa_stage="sparse"))
            kl = output.terms.indexer_loss
            (output.lm_loss + kl).backward()
        losses[dtype] = output.lm_loss.item(), kl.item()
        assert kl.dtype == torch.float32 and all(p.grad is not None for ix in model.indexers() for p in ix.parameters())
        model.zero_grad(set_to_none=True)
    for got, want in zip(losses[torch.bfloat16], losses[torch.float32]):
        assert got == pytest.approx(want, rel=0.05)


def test_index_scores_in_query_chunks_equal_one_product(monkeypatch):
    """Long contexts score queries in chunks (bounded memory); the scores, and their gradients, are the same."""
    from nanoseek.models.deepseek_v32 import indexer as indexer_module

    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 20, 8, 8, generator=generator, requires_grad=True)
    weights, keys = torch.randn(2, 20, 8, generator=generator), torch.randn(2, 20, 8, generator=generator)
    whole = indexer_module.index_scores(q, weights, keys)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), q)
    monkeypatch.setattr(indexer_module, "SCORE_CHUNK_ELEMENTS", 2 * 8 * 20 * 3)  # 3 queries a chunk: 7 chunks
    chunked = indexer_module.index_scores(q, weights, keys)
    (grad_chunked,) = torch.autograd.grad(chunked.square().sum(), q)
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad_chunked, grad_whole, rtol=1e-5, atol=1e-6)
