"""What a new user runs into first: `chat` with a long reply or a long conversation, Ctrl-C at its prompt, honest
progress figures, a full disk under the final model save, and a crafted checkpoint that must not run code."""

from __future__ import annotations

import builtins
import json
import pickle
import resource

import pytest
import torch

import nanoseek
from helpers import micro_model_dir, tiny_config
from nanoseek.cli import main
from nanoseek.errors import CheckpointError
from nanoseek.train.metrics import PeakFlops, Throughput, progress_text


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return micro_model_dir(
        tmp_path_factory.mktemp("chat") / "m", "User: hello there\nAssistant: good morrow\n" * 50, 300, 320, chat=True
    )


def _typed(monkeypatch, lines: list) -> None:
    """`input()` answers with these lines in turn; an exception in the list is raised instead (Ctrl-C, Ctrl-D)."""
    answers = iter(lines)

    def fake_input(prompt: str = "") -> str:
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(builtins, "input", fake_input)


@pytest.mark.parametrize("flag", ["128", "300", "0"])
def test_chat_refuses_a_reply_longer_than_the_context(chat_model, capsys, flag):
    assert main(["chat", str(chat_model), "--max-new-tokens", flag]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "nanoseek: error: --max-new-tokens must be between 1 and 127 (the model's context is 128 tokens), "
        f"got {flag}"
    )


def test_chat_drops_whole_old_turns_and_says_so(chat_model, capsys, monkeypatch):
    """A conversation longer than the context loses its oldest messages, whole and announced; a message too long
    on its own is not sent, and the conversation goes on; Ctrl-C at the prompt ends it without a traceback."""
    long = "hello there " * 12
    _typed(monkeypatch, [long, long, long, "hello " * 200, "hello", KeyboardInterrupt()])
    assert main(["chat", str(chat_model), "--max-new-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "oldest messages no longer fit in the context and were dropped" in out
    assert "(not sent: the message is" in out and "room for 120" in out
    assert out.count("model>") == 4


def test_progress_figures_are_honest(monkeypatch):
    """tok/s covers a stated window, not the last interval; MFU cannot pass 100 % and a measured peak the run beats
    is measured again (raised, never lowered)."""
    throughput = Throughput(window=50)
    throughput.add(10, 1.0)  # a slow start: 10 steps/s
    for _ in range(10):
        throughput.add(10, 0.1)  # then 100 steps/s
    assert throughput.steps == 50 and throughput.tokens_per_s(tokens_per_step=1) == pytest.approx(100)
    measurements = iter([1e9, 4e9])
    monkeypatch.setattr("nanoseek.train.metrics.measure_peak_flops", lambda device, dtype: next(measurements))
    peak = PeakFlops(torch.device("cpu"), torch.float32, processes=1)
    assert peak.source == "measured" and peak.mfu(0.5e9) == 0.5
    assert peak.mfu(2e9) == 0.5 and peak.per_process == 4e9  # measured again, at an idle moment: 4 GFLOP/s
    row = {"loss": 3.0, "tokens_per_s": 1234.0, "tokens_per_s_steps": 50, "mfu": 1.0}
    assert progress_text(row, None, "measured") == "loss 3.000 tok/s 1234 (last 50 steps) mfu≈≥100%"
    assert "val 2.500" in progress_text(row, 2.5, "datasheet")


def test_final_model_save_on_a_full_disk_keeps_the_previous_files(tmp_path):
    model = nanoseek.build_model(tiny_config())
    nanoseek.save_pretrained(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))  # Python ignores SIGXFSZ: EFBIG
    try:
        with pytest.raises(CheckpointError, match="cannot write .*model.safetensors: File too large"):
            nanoseek.save_pretrained(model, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


class _Payload:
    """Unpickling this would run code (here: write a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_rng_file_is_refused_not_run(tmp_path, capsys):
    """RNG states load with weights_only=True: a pickle that would run code on --resume is refused as damaged."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 300)
    args = [
        "train",
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "run"),
        "model.hidden_size=32",
        "model.num_hidden_layers=1",
        "model.max_position_embeddings=32",
        "train.seq_len=8",
        "train.batch_size=2",
        "train.eval_batches=1",
        "train.vocab_size=260",
        "--max-steps",
        "1",
    ]
    assert main(args) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000001"
    marker = tmp_path / "pwned"
    (checkpoint / "rng-0.pt").write_bytes(pickle.dumps({"torch": _Payload(str(marker))}))
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint RNG file {checkpoint / 'rng-0.pt'} is damaged" in err and not marker.exists()
    assert json.loads((checkpoint / "trainer.json").read_text())["step"] == 1


def test_a_model_too_large_for_the_machine_is_refused_before_allocation(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 300)
    assert (
        main(
            [
                "train",
                "--data",
                str(corpus),
                "--out",
                str(tmp_path / "run"),
                "model.hidden_size=100000",
                "train.vocab_size=260",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "parameters: their weights, gradients and AdamW states need" in err and "GiB is free on cpu" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
