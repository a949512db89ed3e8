"""Bad training input: one clear error line, a non-zero exit, and no file of an existing run touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.data.tokenizer import train_tokenizer


def _train(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOSEEK_CACHE": str(tmp / "cache"), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "nanoseek", "train", "--out", str(tmp / "run"), *args],
                          env=env, capture_output=True, text=True)


def _assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("nanoseek: error:") and needle in lines[0], lines[0]


@pytest.mark.parametrize("corpus, needle", [
    (None, "corpus not found"),
    (b"", "holds no text"),
    (b"\x00\x01\x02binary\x00" * 100, "looks binary"),
    (b"\xff\xfe\xfa not utf-8", "not UTF-8"),
])
def test_bad_corpus(tmp_path, corpus, needle):
    path = tmp_path / "corpus.txt"
    if corpus is not None:
        path.write_bytes(corpus)
    _assert_one_line_error(_train(tmp_path, "--data", str(path)), needle)
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_vocab(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    train_tokenizer([(tmp_path / "corpus.txt").read_text()], 500).save(str(tmp_path / "tok.json"))
    result = _train(tmp_path, "--data", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "tok.json"),
                    "model.vocab_size=64")
    _assert_one_line_error(result, "vocab_size")


def test_bad_override_and_config(tmp_path):
    _assert_one_line_error(_train(tmp_path, "model.n_group=3"), "n_group")
    _assert_one_line_error(_train(tmp_path, "train.nonsense=1"), "unknown setting")
    _assert_one_line_error(_train(tmp_path, "train.precision=fp16"), "'precision': one of auto, fp32, bf16, fp8")
    (tmp_path / "c.yaml").write_text("train: [1, 2\n")
    _assert_one_line_error(_train(tmp_path, "--config", str(tmp_path / "c.yaml")), "cannot parse")


def test_existing_run_and_truncated_checkpoint_leave_files_alone(tmp_path):
    (tmp_path / "corpus.txt").write_text("".join(f"LINE {i} of some play text.\n" for i in range(3000)))
    tiny = ["--data", str(tmp_path / "corpus.txt"), "--max-steps", "4", "--save-every", "2", "model.hidden_size=32",
            "model.num_hidden_layers=2", "train.vocab_size=300", "model.max_position_embeddings=64",
            "train.seq_len=32", "train.batch_size=2", "train.eval_batches=1"]
    assert _train(tmp_path, *tiny).returncode == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _assert_one_line_error(_train(tmp_path, *tiny), "already holds a run")
    weights = next((run / "checkpoints" / "step_0000004").glob("*.distcp"))
    weights.write_bytes(before[weights][:100])
    before[weights] = weights.read_bytes()
    _assert_one_line_error(_train(tmp_path, *tiny, "--resume"), "damaged or truncated")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
