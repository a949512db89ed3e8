"""torch.distributed on 2 CPU processes (gloo): DP2 and EP2 equal the single-process run on the same global batch,
DCP checkpoints resume on a different number of processes, and a dead peer stops the others with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import MICRO_YAML, _corpus_lines
from nanoseek.data.tokenizer import train_tokenizer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text("\n".join(_corpus_lines()))
    (root / "micro.yaml").write_text(MICRO_YAML.replace("max_steps: 30", "max_steps: 6")
                                     .replace("save_every: 5", "save_every: 3"))
    train_tokenizer([(root / "corpus.txt").read_text()], 300).save(str(root / "tokenizer.json"))
    return root


def _args(space: Path, out: str, *extra: str) -> list[str]:
    return ["-m", "nanoseek", "train", "--config", str(space / "micro.yaml"), "--data", str(space / "corpus.txt"),
            "--tokenizer", str(space / "tokenizer.json"), "--out", str(space / out), *extra]


def _env(space: Path) -> dict[str, str]:
    return {**os.environ, "NANOSEEK_CACHE": str(space / "cache"), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _run(space: Path, out: str, *extra: str, processes: int = 1) -> None:
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    result = subprocess.run(launcher + _args(space, out, *extra), env=_env(space),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(space: Path, out: str) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (space / out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["mtp_loss"]) for r in rows}


def _assert_close(a: dict, b: dict, steps) -> None:
    for step in steps:
        for x, y in zip(a[step], b[step]):
            assert abs(x - y) <= 1e-5 * abs(y), (step, x, y)


@pytest.fixture(scope="module")
def single(space) -> dict:
    _run(space, "single")
    return _losses(space, "single")


@pytest.mark.parametrize("mode", [[], ["--ep", "2"]], ids=["dp2", "ep2"])
def test_two_processes_equal_one(space, single, mode):
    out = "dp2" if not mode else "ep2"
    _run(space, out, *mode, processes=2)
    losses = _losses(space, out)
    assert sorted(losses) == list(range(1, 7))
    _assert_close(losses, single, range(1, 7))


def test_fp8_with_bf16_moments_under_expert_parallelism(space):
    """FP8 GEMMs, BF16 moments and recomputation compose with EP + FSDP. Not bit-equal to one process: the weight
    gradient's 128-token tiles hold different tokens when the batch is split."""
    fp8 = ("train.precision=fp8", "train.optimizer_moments=bf16", "train.recompute=true")
    _run(space, "fp8-single", *fp8)
    _run(space, "fp8-ep2", "--ep", "2", *fp8, processes=2)
    one, two = _losses(space, "fp8-single"), _losses(space, "fp8-ep2")
    for step in range(1, 7):
        assert abs(one[step][0] - two[step][0]) <= 1e-3 * one[step][0], step


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_dcp_resume_on_other_process_count(space, single, before, after):
    out = f"resume-{before}-{after}"
    _run(space, out, "train.max_steps=6", *(["--ep", "2"] if before == 2 else []), processes=before)
    shutil.rmtree(space / out / "checkpoints" / "step_0000006")  # back to the step-3 checkpoint
    _run(space, out, "--resume", *(["--ep", "2"] if after == 2 else []), processes=after)
    _assert_close(_losses(space, out), single, range(4, 7))


def test_dead_peer_stops_the_other_with_a_clear_error(space):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = _args(space, "dead", "train.max_steps=100000", "train.eval_every=100000", "train.save_every=100000")
    env = {**_env(space), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    deadline = time.time() + 120
    while not (space / "dead" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    ranks[1].send_signal(signal.SIGKILL)
    start = time.time()
    _, stderr = ranks[0].communicate(timeout=150)
    assert ranks[0].returncode == 2 and time.time() - start < 150
    assert stderr.strip().splitlines()[-1].startswith("nanoseek: error: rank 0: a collective")


def test_export_of_an_expert_parallel_checkpoint(space):
    import nanoseek
    import torch

    if not (space / "ep2").exists():
        _run(space, "ep2", "--ep", "2", processes=2)
    out = space / "exported"
    subprocess.run([sys.executable, "-m", "nanoseek", "export", str(space / "ep2" / "checkpoints" / "step_0000006"),
                    str(out)], env=_env(space), check=True, capture_output=True)
    exported, final = nanoseek.load_pretrained(out), nanoseek.load_pretrained(space / "ep2")
    for (name, a), b in zip(exported.state_dict().items(), final.state_dict().values()):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in (space / "ep2" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["a2a_bytes"] > 0 for r in rows)


@pytest.fixture(scope="module")
def single_four_layers(space) -> dict:
    _run(space, "single4", "model.num_hidden_layers=4")  # enough layers for 2 stages on each of 2 ranks
    return _losses(space, "single4")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved1f1b", "zbv", "dualpipev"])
def test_pipeline_schedules_equal_one_process(space, single_four_layers, schedule):
    out = f"pp-{schedule}"
    _run(space, out, "model.num_hidden_layers=4", "--pp", "2", "--pp-schedule", schedule, processes=2)
    _assert_close(_losses(space, out), single_four_layers, range(1, 7))
    val = {json.loads(r)["step"]: json.loads(r).get("val_loss") for r in
           (space / out / "metrics.jsonl").read_text().splitlines()}
    reference = {json.loads(r)["step"]: json.loads(r).get("val_loss") for r in
                 (space / "single4" / "metrics.jsonl").read_text().splitlines()}
    assert val[6] == pytest.approx(reference[6], rel=1e-5)


def test_pipeline_checkpoint_resumes_on_one_process(space, single_four_layers):
    out = "pp-resume"
    _run(space, out, "model.num_hidden_layers=4", "--pp", "2", processes=2)
    shutil.rmtree(space / out / "checkpoints" / "step_0000006")
    _run(space, out, "--resume")
    _assert_close(_losses(space, out), single_four_layers, range(4, 7))


def test_pipeline_times_data_parallel_on_four_processes(space):
    _run(space, "single-b8", "model.num_hidden_layers=4", "train.batch_size=8", "train.max_steps=4")
    out = "pp2-dp2"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                             *_args(space, out, "model.num_hidden_layers=4", "train.batch_size=8",
                                    "train.max_steps=4", "--pp", "2", "--pp-schedule", "interleaved1f1b")],
                            env=_env(space), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_close(_losses(space, out), _losses(space, "single-b8"), range(1, 5))
