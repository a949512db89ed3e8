"""Training: exact resume after SIGKILL, atomic checkpoints, balancing, MTP on/off, run dir = model dir."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

import nanoseek
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.train import checkpoint as train_checkpoint
from nanoseek.train.checkpoint import list_checkpoints

MICRO_YAML = """
model:
  hidden_size: 32
  intermediate_size: 64
  moe_intermediate_size: 16
  num_hidden_layers: 2
  num_attention_heads: 2
  q_lora_rank: 16
  kv_lora_rank: 16
  qk_nope_head_dim: 8
  qk_rope_head_dim: 8
  v_head_dim: 8
  n_routed_experts: 8
  num_experts_per_tok: 2
  n_group: 2
  topk_group: 1
  vocab_size: 320
  max_position_embeddings: 64
train:
  seq_len: 32
  batch_size: 4
  max_steps: 30
  warmup_steps: 5
  eval_every: 10
  eval_batches: 2
  save_every: 5
  log_every: 1
  vocab_size: 300
"""


def _corpus_lines() -> list[str]:
    names = ["HAMLET", "OPHELIA", "HORATIO", "LAERTES"]
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    return [f"{names[i % 4]}.\n{' '.join(words[(i * j) % len(words)] for j in range(3, 12))}\n" for i in range(1500)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    (root / "corpus.txt").write_text("\n".join(_corpus_lines()))
    (root / "micro.yaml").write_text(MICRO_YAML)
    tokenizer = train_tokenizer([(root / "corpus.txt").read_text()], 300)
    tokenizer.save(str(root / "tokenizer.json"))
    return root


def _cli(workspace: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nanoseek",
        "train",
        "--config",
        str(workspace / "micro.yaml"),
        "--data",
        str(workspace / "corpus.txt"),
        "--tokenizer",
        str(workspace / "tokenizer.json"),
        "--out",
        str(out),
        *extra,
    ]


def _env(workspace: Path) -> dict[str, str]:
    return {**os.environ, "NANOSEEK_CACHE": str(workspace / "cache"), "TQDM_DISABLE": "1"}


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow  # suite time: bit-identical resume runs by default after SIGTERM, a kill mid-save in process
def test_resume_after_sigkill_matches_uninterrupted_run(workspace):
    env = _env(workspace)
    _straight_run(workspace)
    killed = workspace / "killed"
    process = subprocess.Popen(_cli(workspace, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_0000010").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed_from = list_checkpoints(killed / "checkpoints")[-1].name
    assert resumed_from != "step_0000030"
    subprocess.run(_cli(workspace, killed, "--resume"), env=env, check=True, capture_output=True)
    straight, resumed = _losses(workspace / "straight"), _losses(killed)
    assert sorted(resumed) == list(range(1, 31))
    assert resumed == straight  # bit for bit, every step before and after the kill


def _straight_run(workspace: Path) -> Path:
    """The uninterrupted 30-step run the interrupted ones are compared with (made once per module)."""
    straight = workspace / "straight"
    if not (straight / "model.safetensors").exists():
        subprocess.run(_cli(workspace, straight), env=_env(workspace), check=True, capture_output=True)
    return straight


def test_sigterm_at_a_random_step_checkpoints_then_resumes_bit_identical(workspace):
    """A preempted job: SIGTERM at a random step finishes that step, writes a checkpoint there (not at the last
    save_every), says how to resume and exits 75; the resumed run's losses are the uninterrupted run's, bit for bit."""
    straight = _straight_run(workspace)
    stopped, env = workspace / "sigterm", _env(workspace)
    seed = 44  # every draw in the suite is seeded, so a failure repeats; another seed tries another step
    signal_after = random.Random(seed).randint(3, 20)
    process = subprocess.Popen(_cli(workspace, stopped), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while (
        time.time() < deadline and len(_losses(stopped) if (stopped / "metrics.jsonl").exists() else {}) < signal_after
    ):
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    stderr = process.stderr.read().decode()
    assert process.wait() == 75, stderr
    step = list_checkpoints(stopped / "checkpoints")[-1].name
    assert int(step.removeprefix("step_")) >= signal_after, (step, signal_after, f"seed {seed}")
    assert "Traceback" not in stderr and f"checkpoint {stopped / 'checkpoints' / step}" in stderr
    assert f"nanoseek train --out {stopped} --resume" in stderr
    subprocess.run(_cli(workspace, stopped, "--resume"), env=env, check=True, capture_output=True)
    assert _losses(stopped) == _losses(straight), f"stopped at {step} (seed {seed})"


def test_a_full_disk_keeps_the_previous_checkpoint(workspace):
    """A checkpoint write that fails part-way (a file-size limit, as a full disk does) stops the run with one line
    naming the path and the cause; the partial checkpoint is removed, never listed, and the previous one resumes."""
    run, env = workspace / "full-disk", _env(workspace)
    subprocess.run(_cli(workspace, run, "--max-steps", "5"), env=env, check=True, capture_output=True)
    previous = list_checkpoints(run / "checkpoints")
    limit = max(f.stat().st_size for f in previous[-1].iterdir()) // 2

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG

    failed = subprocess.run(
        _cli(workspace, run, "--resume", "--max-steps", "10"), env=env, capture_output=True, preexec_fn=small_disk
    )
    lines = [line for line in failed.stderr.decode().strip().splitlines() if not line.startswith("training:")]
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr.decode()  # one line besides the progress bar
    assert f"cannot write checkpoint {run / 'checkpoints' / 'step_0000010'}: File too large" in lines[0]
    assert list_checkpoints(run / "checkpoints") == previous
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000005"]  # no partial one left
    subprocess.run(_cli(workspace, run, "--resume", "--max-steps", "10"), env=env, check=True, capture_output=True)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_0000005", "step_0000010"]


def _save_that_dies(real_save, on_call: int):
    """dcp.save that writes, then raises KeyboardInterrupt on its on_call-th call: the checkpoint dies after its
    tensors are written, before it is complete."""
    calls = []

    def save(state, checkpoint_id, **options):
        calls.append(checkpoint_id)
        real_save(state, checkpoint_id=checkpoint_id, **options)
        if len(calls) == on_call:
            raise KeyboardInterrupt

    return save


def test_kill_during_checkpoint_write_keeps_previous(workspace, monkeypatch):
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.trainer import RunSpec, train

    monkeypatch.setenv("NANOSEEK_CACHE", str(workspace / "cache"))
    real_save = train_checkpoint.dcp.save
    monkeypatch.setattr(train_checkpoint.dcp, "save", _save_that_dies(real_save, on_call=2))
    config = nanoseek.preset("tiny").replace(
        hidden_size=32, num_hidden_layers=2, vocab_size=320, max_position_embeddings=64
    )
    train_config = TrainConfig(
        seq_len=32,
        batch_size=2,
        max_steps=10,
        save_every=5,
        eval_batches=1,
        tokenizer=str(workspace / "tokenizer.json"),
    )
    spec = RunSpec(workspace / "dying", config, train_config, [str(workspace / "corpus.txt")])
    with pytest.raises(KeyboardInterrupt):
        train(spec, show_progress=False)
    assert [p.name for p in list_checkpoints(spec.out / "checkpoints")] == ["step_0000005"]
    monkeypatch.setattr(train_checkpoint.dcp, "save", real_save)
    summary = train(RunSpec(spec.out, config, spec.train, spec.data, resume=True), show_progress=False)
    assert summary["final"]["step"] == 10
    assert [p.name for p in list_checkpoints(spec.out / "checkpoints")] == ["step_0000005", "step_0000010"]


# without MTP: slow-marked (suite time); the dense baseline's run (no MTP) loads as a model directory by default
@pytest.mark.parametrize("mtp", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_run_dir_is_a_model_dir(workspace, mtp):
    import transformers

    out = workspace / f"mtp-{mtp}"
    extra = [] if mtp else ["--no-mtp"]
    subprocess.run(
        _cli(workspace, out, "--max-steps", "10", *extra), env=_env(workspace), check=True, capture_output=True
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ("mtp_loss" in rows[-1]) == mtp and rows[-1]["val_loss"] > 0
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "loss.png"):
        assert (out / name).exists(), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # as lm-evaluation-harness's hf backend loads it
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert (
        tokenizer("HAMLET. to be").input_ids
        == Tokenizer.from_file(str(out / "tokenizer.json")).encode("HAMLET. to be").ids
    )
    ours = nanoseek.load_pretrained(out)
    assert len(ours.mtp) == int(mtp)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max() < 1e-5
    text = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanoseek",
            "generate",
            str(out),
            "--prompt",
            "HAMLET.",
            "--max-new-tokens",
            "12",
            "--seed",
            "0",
        ],
        env=_env(workspace),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert text.startswith("HAMLET.") and len(text) > len("HAMLET.")


def test_aux_free_balancing_evens_expert_load(workspace, monkeypatch):
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.trainer import RunSpec, train

    monkeypatch.setenv("NANOSEEK_CACHE", str(workspace / "cache"))
    config = nanoseek.preset("tiny").replace(
        hidden_size=32, num_hidden_layers=2, vocab_size=320, max_position_embeddings=64, num_nextn_predict_layers=0
    )
    imbalance = {}
    for balance in ("aux-free", "none"):
        cfg = TrainConfig(
            seq_len=32,
            batch_size=4,
            max_steps=150,
            save_every=1000,
            eval_every=1000,
            eval_batches=1,
            balance=balance,
            lr=1e-2,
            tokenizer=str(workspace / "tokenizer.json"),
        )
        summary = train(
            RunSpec(workspace / f"balance-{balance}", config, cfg, str(workspace / "corpus.txt")), show_progress=False
        )
        imbalance[balance] = summary["imbalance_last_100"]
    assert imbalance["aux-free"] < imbalance["none"]
    assert imbalance["aux-free"] <= 1.3


def test_v4_trains_resumes_bit_identical_and_is_a_transformers_model(workspace, monkeypatch):
    """DeepSeek-V4 from scratch with the same trainer: the loss falls, the CSA indexer learns by its KL, the MTP depth
    by its loss, a resumed run repeats the uninterrupted one bit for bit (hash tables included), the routed layers'
    biases move (the MTP block's too) and the hash-routed one has none, and the run directory loads in transformers
    (which skips the MTP layer) with the same logits."""
    import transformers

    from nanoseek.models.deepseek_v4.config import CSA, HCA, SLIDING
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.trainer import RunSpec, train

    monkeypatch.setenv("NANOSEEK_CACHE", str(workspace / "cache"))
    config = nanoseek.preset("tiny-v4").replace(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        head_dim=16,
        qk_rope_head_dim=8,
        q_lora_rank=16,
        moe_intermediate_size=16,
        vocab_size=320,
        max_position_embeddings=64,
        layer_types=(SLIDING, CSA, HCA),
        mlp_layer_types=("hash_moe", "moe", "moe"),
        sliding_window=8,
        compress_rate_hca=8,
        o_lora_rank=8,
        index_head_dim=8,
        index_topk=2,
        hc_mult=2,
        num_nextn_predict_layers=1,
    )

    def run(name: str, resume: bool = False) -> dict:
        cfg = TrainConfig(
            seq_len=32,
            batch_size=2,
            max_steps=8,
            save_every=4,
            eval_every=1000,
            eval_batches=1,
            log_every=1,
            lr=1e-2,
            warmup_steps=2,
            tokenizer=str(workspace / "tokenizer.json"),
        )
        return train(
            RunSpec(workspace / name, config, cfg, str(workspace / "corpus.txt"), resume=resume), show_progress=False
        )

    run("v4-straight")
    real_save = train_checkpoint.dcp.save  # the run dies writing its step-8 checkpoint: it resumes from step 4
    monkeypatch.setattr(train_checkpoint.dcp, "save", _save_that_dies(real_save, on_call=2))
    with pytest.raises(KeyboardInterrupt):
        run("v4-resumed")
    monkeypatch.setattr(train_checkpoint.dcp, "save", real_save)
    assert [p.name for p in list_checkpoints(workspace / "v4-resumed" / "checkpoints")] == ["step_0000004"]
    run("v4-resumed", resume=True)
    straight, resumed = _losses(workspace / "v4-straight"), _losses(workspace / "v4-resumed")
    assert sorted(straight) == list(range(1, 9)) and resumed == straight
    assert straight[8] < straight[1]
    last = json.loads((workspace / "v4-straight" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["indexer_kl"] > 0  # the CSA layer's indexer learns by DSA's KL, as V3.2's
    assert (
        0
        < last["mtp_loss"]
        < json.loads((workspace / "v4-straight" / "metrics.jsonl").read_text().splitlines()[0])["mtp_loss"]
    )
    ours = nanoseek.load_pretrained(workspace / "v4-straight")
    assert len(ours.mtp) == 1
    hashed, *routed = [layer.mlp.router for layer in [*ours.layers, ours.mtp[0].block]]
    assert not hasattr(hashed, "expert_bias") and hashed.tid2eid.unique().numel() == config.n_routed_experts
    assert all(router.expert_bias.abs().sum() > 0 for router in routed)
    reference = transformers.AutoModelForCausalLM.from_pretrained(workspace / "v4-straight")
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max() < 1e-5
