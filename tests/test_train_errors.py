"""Training through the CLI: bad input gets one clear error line, a non-zero exit, and no file of an existing run
touched; and the balancing and rotation settings do what they say. The command
runs in-process (`nanoseek.cli.main`): what is under test is its exit code and stderr, not a process boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanoseek.cli import main
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.presets import preset


@pytest.fixture
def train(tmp_path, capsys, monkeypatch):
    """`nanoseek train --out tmp/run ARGS` → (exit code, stderr without the progress bar)."""
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["train", "--out", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err
        return code, "\n".join(line for line in err.splitlines() if line.strip() and not line.startswith("training:"))

    return run


def _assert_one_line_error(result: tuple[int, str], needle: str) -> None:
    code, stderr = result
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("nanoseek: error:") and needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "corpus, needle",
    [
        (None, "corpus not found"),
        (b"", "holds no text"),
        (b"\x00\x01\x02binary\x00" * 100, "looks binary"),
        (b"\xff\xfe\xfa not utf-8", "not UTF-8"),
    ],
)
def test_bad_corpus(tmp_path, train, corpus, needle):
    path = tmp_path / "corpus.txt"
    if corpus is not None:
        path.write_bytes(corpus)
    _assert_one_line_error(train("--data", str(path)), needle)
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_vocab(tmp_path, train):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    train_tokenizer([(tmp_path / "corpus.txt").read_text()], 500).save(str(tmp_path / "tok.json"))
    result = train(
        "--data", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "tok.json"), "model.vocab_size=64"
    )
    _assert_one_line_error(result, "vocab_size")


def test_bad_override_and_config(tmp_path, train):
    _assert_one_line_error(train("model.n_group=3"), "n_group")
    _assert_one_line_error(train("train.nonsense=1"), "unknown setting")
    _assert_one_line_error(train("train.precision=fp16"), "'precision': must be one of 'auto', 'fp32', 'bf16', 'fp8'")
    (tmp_path / "c.yaml").write_text("train: [1, 2\n")
    _assert_one_line_error(train("--config", str(tmp_path / "c.yaml")), "cannot parse")


def _tiny_run(tmp: Path, train, steps: int) -> list[str]:
    """Trains a tiny run in tmp/run; → its command-line arguments."""
    (tmp / "corpus.txt").write_text("".join(f"LINE {i} of some play text.\n" for i in range(3000)))
    tiny = [
        "--data",
        str(tmp / "corpus.txt"),
        "--max-steps",
        str(steps),
        "--save-every",
        "2",
        "model.hidden_size=32",
        "model.num_hidden_layers=2",
        "train.vocab_size=300",
        "model.max_position_embeddings=64",
        "train.seq_len=32",
        "train.batch_size=2",
        "train.eval_batches=1",
    ]
    assert train(*tiny)[0] == 0
    return tiny


def _files(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_existing_run_and_truncated_checkpoint_leave_files_alone(tmp_path, train):
    tiny = _tiny_run(tmp_path, train, steps=4)
    run = tmp_path / "run"
    before = _files(run)
    _assert_one_line_error(train(*tiny), "already holds a run")
    weights = next((run / "checkpoints" / "step_0000004").glob("*.distcp"))
    weights.write_bytes(before[weights][:100])
    before[weights] = weights.read_bytes()
    _assert_one_line_error(train(*tiny, "--resume"), "damaged or truncated")
    assert _files(run) == before


def test_resume_may_change_the_schedule_but_not_the_shape(tmp_path, train):
    tiny = _tiny_run(tmp_path, train, steps=2)
    (tmp_path / "other.txt").write_text("".join(f"Other {i} text.\n" for i in range(3000)))
    run = tmp_path / "run"
    before = _files(run)
    _assert_one_line_error(train(*tiny, "--resume", "model.hidden_size=64"), "model.hidden_size is 32")
    _assert_one_line_error(train("--resume", "train.seq_len=16"), "train.seq_len")
    _assert_one_line_error(train("--resume", "--preset", "small"), "model.hidden_size")
    _assert_one_line_error(train("--resume", "--data", str(tmp_path / "other.txt")), "trained on")
    assert _files(run) == before
    # the same command with --resume, a longer run and a new evaluation cadence: taken
    code, stderr = train(*tiny, "--resume", "--max-steps", "4", "--eval-every", "3")
    assert code == 0, stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4]  # logged: every 10 steps and at each evaluation
    assert all("val_loss" in r for r in rows)
    # within the warm-up the learning rate does not depend on max_steps: the run made in one go with the new
    # settings has the resumed run's losses, bit for bit
    run.rename(tmp_path / "resumed")
    assert train(*tiny, "--max-steps", "4", "--eval-every", "3")[0] == 0
    straight = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["val_loss"]) for r in straight] == [
        (r["step"], r["loss"], r["val_loss"]) for r in rows if r["step"] > 2
    ]  # (it logs step 2 only when it ends)


def test_resume_ignores_what_the_run_derived_itself():
    """The vocabulary size and special tokens come from the run's tokenizer, the MTP depth from --no-mtp: the same
    command line with --resume is taken even where its config said otherwise."""
    from nanoseek.errors import ConfigError
    from nanoseek.train.config import TrainConfig, resume_train_config

    asked = preset("tiny").replace(vocab_size=16384, num_nextn_predict_layers=1)
    saved = asked.replace(vocab_size=4096, bos_token_id=3, eos_token_id=3, num_nextn_predict_layers=0)
    explicit = frozenset({"model.vocab_size", "model.num_nextn_predict_layers", "train.max_steps"})
    resumed = resume_train_config(saved, TrainConfig(), asked, TrainConfig(max_steps=900), explicit)
    assert resumed == TrainConfig(max_steps=900)
    with pytest.raises(ConfigError, match="model.hidden_size is 192"):
        resume_train_config(
            saved, TrainConfig(), asked.replace(hidden_size=256), TrainConfig(), explicit | {"model.hidden_size"}
        )


def test_failures_name_their_cause():
    """Out of memory is said as such (before, under torchrun, any RuntimeError read "a collective failed"); a dead
    peer names the collective's error and the timeout to raise; anything else keeps its traceback."""
    import torch
    import torch.distributed as dist

    from nanoseek.parallel.setup import Parallelism, explain_failure

    two = Parallelism(dp=2, rank=1)
    oom = str(explain_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), two, 120))
    assert oom.startswith("rank 1: out of memory") and "Tried to allocate 2.00 GiB" in oom
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 8 bytes")
    assert "out of memory on cpu" in str(explain_failure(cpu, Parallelism(), 120))
    peer = str(explain_failure(dist.DistBackendError("NCCL communicator was aborted"), two, 300))
    assert "collective_timeout_s=300" in peer and "DistBackendError: NCCL communicator was aborted" in peer
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    assert "Connection closed by peer" in str(explain_failure(gloo, two, 120))
    assert explain_failure(gloo, Parallelism(), 120) is None  # one process has no peer to blame
    assert explain_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)"), two, 120) is None


def test_timeouts_are_settings_a_resume_may_change(train):
    from nanoseek.train.config import RESUMABLE

    _assert_one_line_error(train("train.collective_timeout_s=0"), "collective_timeout_s")
    assert {"collective_timeout_s", "checkpoint_timeout_s"} <= RESUMABLE


def test_aux_loss_balancing_trains_by_its_loss_and_old_checkpoints_rotate_out(tmp_path, train):
    """`--balance aux-loss`: a sequence-balance loss is logged and its gradient changes the run (against
    `--balance none`, same first step, other second), while the routing biases stay at zero (only aux-free moves
    them); with keep_checkpoints=2 and a save every step only the last two checkpoints remain."""
    from safetensors.torch import load_file

    from nanoseek.train.checkpoint import list_checkpoints

    (tmp_path / "corpus.txt").write_text("".join(f"LINE {i} of some play text.\n" for i in range(3000)))
    tiny = [
        "--data",
        str(tmp_path / "corpus.txt"),
        "--max-steps",
        "4",
        "--save-every",
        "1",
        "model.hidden_size=32",
        "model.num_hidden_layers=2",
        "train.vocab_size=300",
        "model.max_position_embeddings=64",
        "train.seq_len=32",
        "train.batch_size=2",
        "train.eval_batches=1",
        "train.log_every=1",
        "train.keep_checkpoints=2",
    ]
    runs = {}
    for balance in ("aux-loss", "none"):
        assert train(*tiny, "--balance", balance)[0] == 0
        runs[balance] = tmp_path / balance
        (tmp_path / "run").rename(runs[balance])
    rows = {
        b: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for b, run in runs.items()
    }
    assert all(r["aux_loss"] > 0 for r in rows["aux-loss"]) and "aux_loss" not in rows["none"][0]
    assert rows["aux-loss"][0]["loss"] == rows["none"][0]["loss"]
    assert rows["aux-loss"][1]["loss"] != rows["none"][1]["loss"]
    weights = load_file(runs["aux-loss"] / "model.safetensors")
    biases = [t for k, t in weights.items() if k.endswith("e_score_correction_bias")]
    assert biases and all(not b.any() for b in biases)
    assert [p.name for p in list_checkpoints(runs["aux-loss"] / "checkpoints")] == ["step_0000003", "step_0000004"]
