"""torch.distributed on CPU processes (gloo): every layout the CLI accepts equals one process, in fp32 and bf16,
DCP checkpoints resume on a different number of processes, and a dead peer stops the others with a clear error."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from test_train import MICRO_YAML, _corpus_lines

from helpers import run_process_group
from nanoseek.data.tokenizer import train_tokenizer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text("\n".join(_corpus_lines()))
    (root / "micro.yaml").write_text(
        MICRO_YAML.replace("max_steps: 30", "max_steps: 6").replace("save_every: 5", "save_every: 3")
    )
    train_tokenizer([(root / "corpus.txt").read_text()], 300).save(str(root / "tokenizer.json"))
    return root


def _args(space: Path, out: str, *extra: str) -> list[str]:
    return [
        "-m",
        "nanoseek",
        "train",
        "--config",
        str(space / "micro.yaml"),
        "--data",
        str(space / "corpus.txt"),
        "--tokenizer",
        str(space / "tokenizer.json"),
        "--out",
        str(space / out),
        *extra,
    ]


def _env(space: Path) -> dict[str, str]:
    """The processes run on CPUs over gloo whatever the machine has: these tests compare layouts, and a one-GPU
    machine cannot give every rank a device of its own."""
    return {
        **os.environ,
        "NANOSEEK_CACHE": str(space / "cache"),
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


def _run(space: Path, out: str, *extra: str, processes: int = 1) -> None:
    _launch(space, _args(space, out, *extra), processes)


def _launch(space: Path, argv: list[str], processes: int) -> None:
    """`python -m nanoseek ...` (argv) on `processes` ranks under torchrun; one process runs here, in this
    interpreter (an interpreter and torch started per run would cost seconds each: suite time), on the CPU as the
    ranks run."""
    if processes == 1:
        from nanoseek.cli import main

        assert argv[:2] == ["-m", "nanoseek"]
        with mock.patch.dict(os.environ, _env(space)), mock.patch("torch.cuda.is_available", return_value=False):
            assert main(argv[2:]) == 0
        return
    result = run_process_group([*TORCHRUN, "--nproc_per_node", str(processes), *argv], env=_env(space))
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(space: Path, out: str) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (space / out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["mtp_loss"]) for r in rows}


def _assert_close(a: dict, b: dict, steps) -> None:  # (loss, mtp_loss) of each step within 1e-5
    for step in steps:
        for x, y in zip(a[step], b[step]):
            assert abs(x - y) <= 1e-5 * abs(y), (step, x, y)


@pytest.fixture(scope="module")
def trained(space):
    """`trained(out, *flags, processes=N)`: the run directory of that command, trained once per module by whichever
    test asks first (the layout matrix and the export test share one run, the schedule and resume tests another),
    so that no test depends on which ran before it."""
    done: dict[str, tuple] = {}

    def run(out: str, *flags: str, processes: int = 1) -> Path:
        if out not in done:
            _run(space, out, *flags, processes=processes)
            done[out] = (flags, processes)
        assert done[out] == (flags, processes), f"{out} was trained with other flags"
        return space / out

    return run


@pytest.fixture(scope="module")
def single(space) -> dict:
    _run(space, "single")
    return _losses(space, "single")


def _metrics(space: Path, out: str) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (space / out / "metrics.jsonl").read_text().splitlines())}


# Every layout the CLI accepts, as (processes, flags). The micro model has 2 layers: one per pipeline stage.
LAYOUTS = {
    "dp2": (2, []),
    "ep2": (2, ["--ep", "2"]),
    "dp4-ep2": (4, ["--ep", "2"]),
    "pp2": (2, ["--pp", "2"]),
    "dp2-pp2": (4, ["--pp", "2"]),
    "pp2-ep2": (4, ["--pp", "2", "--ep", "2"]),
}
# Relative tolerances against the one-process run of the same precision. fp32: the layouts only change the order
# of fp32 additions (measured <= 2e-7). bf16 keeps 8 significant bits, so one rounding is worth u = 2^-8 = 3.9e-3
# relative, and the layouts round different things: FSDP casts every parameter but the routers' to bf16 (norm
# weights included, which one process under autocast keeps fp32) and a split batch changes GEMM shapes and so the order
# of accumulation. A gradient norm can therefore move by about u (measured <= 1.7e-3: allowed 5e-3); a loss is a
# mean over 128 tokens, whose independent rounding differences mostly cancel (measured <= 4e-5: allowed 5e-4).
TOLERANCES = {
    "fp32": {"loss": 1e-5, "mtp_loss": 1e-5, "grad_norm": 1e-5},
    "bf16": {"loss": 5e-4, "mtp_loss": 5e-4, "grad_norm": 5e-3},
}
PARITY_STEPS = ("train.max_steps=4", "train.save_every=100", "train.eval_every=4")
# The default run takes each layout's code path once, in three runs (suite time): dp4-ep2 in bf16 (FSDP's mixed
# precision over four ranks, the experts cast by the same policy over their replicas), pp2-ep2 in fp32 (the pipeline
# with FSDP and EP inside each stage: 4 ranks), pp2 in bf16 (a pipeline stage under autocast; 1F1B, the default
# schedule). `pytest -m slow` runs the whole matrix.
DEFAULT_MATRIX = {("dp4-ep2", "bf16"), ("pp2-ep2", "fp32"), ("pp2", "bf16")}
MATRIX = [
    pytest.param(
        layout,
        precision,
        id=f"{layout}-{precision}",
        marks=() if (layout, precision) in DEFAULT_MATRIX else pytest.mark.slow,
    )
    for precision in TOLERANCES
    for layout in LAYOUTS
]


@pytest.fixture(scope="module")
def one_process(space) -> dict[str, dict]:
    for precision in TOLERANCES:
        _run(space, f"one-{precision}", f"train.precision={precision}", *PARITY_STEPS)
    return {precision: _metrics(space, f"one-{precision}") for precision in TOLERANCES}


@pytest.mark.parametrize("layout, precision", MATRIX)
def test_every_layout_equals_one_process(space, one_process, trained, layout, precision):
    """Losses, MTP losses, gradient norms (clipping is active at these norms, so a wrong norm changes the run) and
    the final validation loss of each layout against one process, in fp32 and in bf16 (FSDP's mixed precision;
    expert parallelism's experts cast by the same policy)."""
    processes, flags = LAYOUTS[layout]
    out = trained(
        f"{layout}-{precision}", *flags, f"train.precision={precision}", *PARITY_STEPS, processes=processes
    ).name
    got, want = _metrics(space, out), one_process[precision]
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        for key, tolerance in TOLERANCES[precision].items():
            assert got[step][key] == pytest.approx(want[step][key], rel=tolerance), (step, key)
    assert got[4]["val_loss"] == pytest.approx(want[4]["val_loss"], rel=TOLERANCES[precision]["loss"])


def test_gradient_accumulation_under_fsdp_equals_one_process(space):
    """Two micro-batches per step: FSDP skips the gradient reduction on the first (no sync until the last)."""
    accumulate = ("train.grad_accum=2", "train.precision=fp32", *PARITY_STEPS)
    _run(space, "accum-one", *accumulate)
    _run(space, "accum-dp2-ep2", "--ep", "2", *accumulate, processes=2)
    got, want = _metrics(space, "accum-dp2-ep2"), _metrics(space, "accum-one")
    for step in want:
        for key, tolerance in TOLERANCES["fp32"].items():
            assert got[step][key] == pytest.approx(want[step][key], rel=tolerance), (step, key)


@pytest.mark.parametrize("stage", [pytest.param("warmup", marks=pytest.mark.slow), "sparse"])
def test_v32_training_stages_under_fsdp_and_ep_equal_one_process(space, stage):
    """DSA's dense warm-up (everything frozen but the indexers: FSDP units with frozen parameters) and sparse
    training (top-k attention, the indexers' KL beside the LM loss) over DP2×EP2: the one-process losses, indexer
    KL and gradient norms."""
    # initializer_range 0.3: peaked attention and index scores, so the KL is far from zero (at 0.02 it is ~1e-7,
    # all fp32 cancellation)
    v32 = (
        "model.index_n_heads=4",
        "model.index_head_dim=8",
        "model.index_topk=8",
        "model.initializer_range=0.3",
        f"train.dsa={stage}",
        "train.precision=fp32",
        *PARITY_STEPS,
    )
    _run(space, f"v32-{stage}-one", *v32)
    _run(space, f"v32-{stage}-dp2-ep2", "--ep", "2", *v32, processes=2)
    got, want = _metrics(space, f"v32-{stage}-dp2-ep2"), _metrics(space, f"v32-{stage}-one")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        for key in ("loss", "indexer_kl", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)
    assert all(row["indexer_kl"] > 0 for row in want.values())


V4 = (
    "model.hidden_size=32",
    "model.num_hidden_layers=3",
    "model.num_attention_heads=2",
    "model.head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.q_lora_rank=16",
    "model.moe_intermediate_size=16",
    "model.o_lora_rank=8",
    "model.layer_types=[sliding_attention,compressed_sparse_attention,heavily_compressed_attention]",
    "model.mlp_layer_types=[hash_moe,moe,moe]",
    "model.sliding_window=8",
    "model.compress_rate_hca=8",
    "model.index_head_dim=8",
    "model.index_topk=2",
    "model.hc_mult=2",
    "model.n_routed_experts=8",
    "model.initializer_range=0.3",
    "model.num_nextn_predict_layers=1",
)


def _v4_args(space: Path, out: str, *extra: str) -> list[str]:
    return [
        "-m",
        "nanoseek",
        "train",
        "--preset",
        "tiny-v4",
        "--data",
        str(space / "corpus.txt"),
        "--tokenizer",
        str(space / "tokenizer.json"),
        "--out",
        str(space / out),
        "train.seq_len=32",
        "train.batch_size=4",
        "train.eval_batches=2",
        "train.vocab_size=300",
        "train.log_every=1",
        "train.warmup_steps=5",
        *V4,
        *extra,
    ]


def test_v4_in_fp8_under_fsdp_and_ep_runs_as_one_process(space):
    """The cheapest form of two compositions the slow tests below check in full: DeepSeek-V4 over DP2×EP2 and FP8
    GEMMs under EP, together, for two steps: the one-process losses within FP8's tolerance (not bit-equal: the
    weight gradient's 128-token tiles hold other tokens when the batch is split), the indexer learning on both."""
    flags = ("train.precision=fp8", "train.max_steps=2", "train.save_every=100", "train.eval_every=100")
    for out, processes, extra in (("v4-fp8-one", 1, ()), ("v4-fp8-ep2", 2, ("--ep", "2"))):
        _launch(space, _v4_args(space, out, *extra, *flags), processes)
    got, want = _metrics(space, "v4-fp8-ep2"), _metrics(space, "v4-fp8-one")
    assert sorted(got) == sorted(want) == [1, 2]
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-3), step
        assert got[step]["indexer_kl"] > 0 and want[step]["indexer_kl"] > 0


@pytest.mark.slow  # 17 s: by default in fp8 for two steps (above); its fp32 FSDP units in a one-rank group (below)
def test_v4_under_fsdp_and_ep_equals_one_process(space):
    """DeepSeek-V4 over DP2×EP2: the one-process losses, CSA indexer KL and gradient norms (hyper-connection
    streams, hash routing, compressors and the indexers' own FSDP units)."""
    flags = ("train.precision=fp32", *PARITY_STEPS)
    for out, processes, extra in (("v4-one", 1, ()), ("v4-dp2-ep2", 2, ("--ep", "2"))):
        _launch(space, _v4_args(space, out, *extra, *flags), processes)
    got, want = _metrics(space, "v4-dp2-ep2"), _metrics(space, "v4-one")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        for key in ("loss", "indexer_kl", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)
    assert all(row["indexer_kl"] > 0 for row in want.values())


@pytest.mark.slow  # a minute of compilation on a fresh machine (test_bench, also slow, compiles the blocks too)
def test_compiled_blocks_train_like_eager(space, one_process):
    """train.compile=true (torch.compile per block; the experts' grouped GEMM stays eager) under FSDP + EP."""
    _run(space, "compiled", "--ep", "2", "train.compile=true", "train.precision=fp32", *PARITY_STEPS, processes=2)
    got, want = _metrics(space, "compiled"), one_process["fp32"]
    for step in want:
        for key, tolerance in TOLERANCES["fp32"].items():
            assert got[step][key] == pytest.approx(want[step][key], rel=tolerance), (step, key)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--pp", "2", "--pp-schedule", "zbv"], "with --dp > 1 is not supported"),
        (["--pp", "2", "--pp-schedule", "dualpipev"], "with --dp > 1 is not supported"),
        (["--ep", "3"], "must divide --dp"),
        (["--pp", "2", "V4"], "V4 is not pipelined"),
    ],
)
def test_refused_layouts_say_why_in_one_line(space, flags, needle, monkeypatch, capsys):
    """What each torchrun process sees (its environment): the layout is checked before any process group is set up."""
    from nanoseek.cli import main

    processes = 4 if "--pp" in flags else 2
    for name, value in {"WORLD_SIZE": str(processes), "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    args = _v4_args(space, "refused", *flags[:-1]) if flags[-1] == "V4" else _args(space, "refused", *flags)
    assert main(args[2:]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("nanoseek: error:") and needle in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not (space / "refused").exists()


@pytest.mark.slow  # 26 s; FP8 under EP runs by default for two steps on V4 (above), FP8 training alone in test_fp8
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
    """A checkpoint written by `before` processes (EP2 on two) resumes on `after`: steps 4-6 are one process's.
    The one-process checkpoint is the `single` run's, copied (suite time)."""
    out = f"resume-{before}-{after}"
    if before == 1:
        shutil.copytree(space / "single", space / out)
    else:
        _run(space, out, "train.max_steps=6", "--ep", "2", processes=before)
    shutil.rmtree(space / out / "checkpoints" / "step_0000006")  # back to the step-3 checkpoint
    _run(space, out, "--resume", *(["--ep", "2"] if after == 2 else []), processes=after)
    _assert_close(_losses(space, out), single, range(4, 7))


def test_dead_peer_stops_the_other_with_a_clear_error(space):
    """Two ranks started by hand (torchrun would stop rank 0 itself); the rendezvous store is this process's, bound
    on a port the OS picks and held open, as torchrun's agent holds its own (TORCHELASTIC_USE_AGENT_STORE)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    args = _args(space, "dead", "train.max_steps=100000", "train.eval_every=100000", "train.save_every=100000")
    env = {
        **_env(space),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "WORLD_SIZE": "2",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        deadline = time.time() + 120
        while not (space / "dead" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        ranks[1].send_signal(signal.SIGKILL)
        start = time.time()
        _, stderr = ranks[0].communicate(timeout=150)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 2 and time.time() - start < 150
    assert stderr.strip().splitlines()[-1].startswith("nanoseek: error: rank 0: a collective")


def test_export_of_an_expert_parallel_checkpoint(space, trained):
    """The last checkpoint of a DP x EP run (the layout matrix's run: suite time) exports to the very weights the
    run saved as its model."""
    import torch

    import nanoseek

    run = trained("dp4-ep2-bf16", *LAYOUTS["dp4-ep2"][1], "train.precision=bf16", *PARITY_STEPS, processes=4)
    out = space / "exported"
    _launch(space, ["-m", "nanoseek", "export", str(run / "checkpoints" / "step_0000004"), str(out)], 1)
    exported, final = nanoseek.load_pretrained(out), nanoseek.load_pretrained(run)
    for (name, a), b in zip(exported.state_dict().items(), final.state_dict().values()):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["a2a_bytes"] > 0 for r in rows)


@pytest.fixture(scope="module")
def single_four_layers(space) -> dict:
    _run(space, "single4", "model.num_hidden_layers=4")  # enough layers for 2 stages on each of 2 ranks
    return _losses(space, "single4")


# GPipe takes 1F1B's path through nanoseek (one stage per rank) and ZBV DualPipeV's (two, V-shaped): both are slow.
# 1F1B is the default schedule: the matrix's pipeline layouts run it by default; DualPipeV runs two stages per rank
@pytest.mark.parametrize(
    "schedule",
    [pytest.param(s, marks=pytest.mark.slow) for s in ("gpipe", "1f1b", "interleaved1f1b", "zbv")] + ["dualpipev"],
)
def test_pipeline_schedules_equal_one_process(space, single_four_layers, trained, schedule):
    out = trained(
        f"pp-{schedule}", "model.num_hidden_layers=4", "--pp", "2", "--pp-schedule", schedule, processes=2
    ).name
    _assert_close(_losses(space, out), single_four_layers, range(1, 7))
    val = {
        json.loads(r)["step"]: json.loads(r).get("val_loss")
        for r in (space / out / "metrics.jsonl").read_text().splitlines()
    }
    reference = {
        json.loads(r)["step"]: json.loads(r).get("val_loss")
        for r in (space / "single4" / "metrics.jsonl").read_text().splitlines()
    }
    assert val[6] == pytest.approx(reference[6], rel=1e-5)


def test_pipeline_checkpoint_resumes_on_one_process(space, single_four_layers, trained):
    """DualPipeV's checkpoint (two stages per rank; the schedule test's run: suite time) resumes on one process."""
    pipelined = trained(
        "pp-dualpipev", "model.num_hidden_layers=4", "--pp", "2", "--pp-schedule", "dualpipev", processes=2
    )
    out = "pp-resume"
    shutil.copytree(pipelined, space / out)
    shutil.rmtree(space / out / "checkpoints" / "step_0000006")
    _run(space, out, "model.num_hidden_layers=4", "--resume")
    _assert_close(_losses(space, out), single_four_layers, range(4, 7))


@pytest.mark.slow  # its paths run by default in the matrix's dp2-pp2 and DualPipeV's two stages per rank
def test_interleaved_pipeline_times_data_parallel(space):
    """DP2 x PP2 with two stages per rank (the matrix covers 1F1B)."""
    _run(space, "single-b8", "model.num_hidden_layers=4", "train.batch_size=8", "train.max_steps=4")
    out = "pp2-dp2"
    _run(
        space,
        out,
        "model.num_hidden_layers=4",
        "train.batch_size=8",
        "train.max_steps=4",
        "--pp",
        "2",
        "--pp-schedule",
        "interleaved1f1b",
        processes=4,
    )
    _assert_close(_losses(space, out), _losses(space, "single-b8"), range(1, 5))


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK → pid of torchrun's worker processes (its children)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else 0
            environ = (entry / "environ").read_bytes().split(b"\0") if parent == launcher_pid else []
        except OSError:  # a process that ended meanwhile
            continue
        ranks.update({int(item[5:]): int(entry.name) for item in environ if item.startswith(b"RANK=")})
    return ranks


def test_sigterm_to_one_rank_stops_every_rank_at_one_checkpoint(space):
    """A preemption that reaches one rank only: the ranks agree after every step, so both stop after the same step
    and write that checkpoint together (each its RNG file); the run then resumes on one process."""
    out = "dp2-sigterm"
    process = subprocess.Popen(
        [*TORCHRUN, "--nproc_per_node", "2"] + _args(space, out, "train.max_steps=400", "train.save_every=1000"),
        env=_env(space),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
            (space / out / "metrics.jsonl").exists()
            and len((space / out / "metrics.jsonl").read_text().splitlines()) >= 2
        ):
            time.sleep(0.01)
        ranks = _rank_pids(process.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)
        stderr = process.communicate(timeout=120)[1]
    finally:  # torchrun and its workers, whatever failed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    checkpoints = sorted((space / out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1, stderr[-2000:]
    step = int(checkpoints[0].name.removeprefix("step_"))
    assert 2 <= step < 400 and {"rng-0.pt", "rng-1.pt"} <= {p.name for p in checkpoints[0].iterdir()}
    assert stderr.count(f"nanoseek: stopped after step {step}") == 1  # rank 0 says it, once
    assert "exitcode  : 75" in stderr  # torchrun reports its workers' status
    _run(space, out, "--resume", f"train.max_steps={step + 2}")
    rows = [json.loads(line) for line in (space / out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step + 2


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone: FSDP and expert parallelism in-process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # no port at all
    yield
    dist.destroy_process_group()


def test_router_stays_fp32_under_fsdp_bf16_mixed_precision(one_rank_group):
    """FSDP2's bf16 policy casts a block's parameters for forward; the routers are units of their own with an fp32
    policy, so routing sees fp32 weights as in one process under autocast (a gloo group of one rank); so are V4's
    hyper-connections, compressors and final stream collapse."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    import nanoseek
    from helpers import tiny_config
    from nanoseek.parallel.setup import Parallelism, shard_blocks

    model = nanoseek.build_model(tiny_config())
    par = Parallelism(dp_mesh=init_device_mesh("cpu", (1,)), compute_dtype=torch.bfloat16)
    shard_blocks(list(model.layers), model, par)
    seen = {}
    moe = model.layers[1].mlp
    moe.router.register_forward_pre_hook(lambda m, a: seen.__setitem__("router", m.weight.dtype))
    moe.shared.register_forward_pre_hook(lambda m, a: seen.__setitem__("shared", m.gate_up.weight.dtype))
    model(torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (2, 8))).lm_loss.backward()
    assert seen == {"router": torch.float32, "shared": torch.bfloat16}
    assert moe.router.weight.grad is not None
    from test_parity_v4 import v4_config

    v4 = nanoseek.build_model(v4_config())
    shard_blocks(list(v4.layers), v4, par)
    seen.clear()
    block = v4.layers[1]
    for name in ("attn_hc", "attn.compressor", "attn.indexer.compressor", "mlp.router"):
        block.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: seen.__setitem__(name, next(m.parameters()).dtype)
        )
    block.attn.q_up.register_forward_pre_hook(lambda m, a: seen.__setitem__("q_up", m.weight.dtype))
    v4.hc_head.register_forward_pre_hook(lambda m, a: seen.__setitem__("hc_head", m.fn.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs
        loss = v4(torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))).lm_loss
    loss.backward()
    assert seen.pop("q_up") == torch.bfloat16 and set(seen.values()) == {torch.float32} and len(seen) == 5


def test_an_expert_parallel_layer_reads_the_device_once(one_rank_group, monkeypatch):
    """The CPU stand-in for CUDA's sync check of expert parallelism: per layer, one host transfer (the all-to-all's
    split sizes, both directions in one tensor) and the row expansion told its output size, so nothing else waits
    for the device; the result equals the experts run in one process."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from nanoseek.models.common.moe import RoutedExperts, sort_by_expert
    from nanoseek.parallel.expert_parallel import ExpertParallelExperts

    torch.manual_seed(0)
    experts = RoutedExperts(8, 16, 12)
    torch.nn.init.normal_(experts.gate_up, std=0.1)
    torch.nn.init.normal_(experts.down, std=0.1)
    x = torch.randn(40, 16)
    order, counts = sort_by_expert(torch.randint(0, 8, (40,)), 8)
    group_ends = counts.cumsum(0).to(torch.int32)
    parallel = ExpertParallelExperts(experts, init_device_mesh("cpu", (1,)))
    host_reads, sized = [], []
    real_tolist, real_repeat = torch.Tensor.tolist, torch.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: host_reads.append(t.shape) or real_tolist(t))
    monkeypatch.setattr(
        torch, "repeat_interleave", lambda *a, **k: sized.append("output_size" in k) or real_repeat(*a, **k)
    )
    out = parallel(x[order], group_ends)
    monkeypatch.undo()
    assert len(host_reads) == 1 and sized == [True]
    assert torch.allclose(out, experts(x[order], group_ends), atol=1e-6)


def test_pipeline_stages_are_sharded_before_they_are_allocated(one_rank_group):
    """PP × DP: a stage's FSDP (and expert-parallel) sharding runs while its weights are still on meta, so no rank
    ever holds a whole stage; only then are this rank's shards allocated."""
    import torch

    from helpers import tiny_config
    from nanoseek.models.registry import build_model
    from nanoseek.parallel.pipeline import build_pipeline

    with torch.device("meta"):
        model = build_model(tiny_config())
    on_meta = []
    build_pipeline(
        model,
        0,
        1,
        "gpipe",
        2,
        lambda *a: None,
        torch.device("cpu"),
        shard=lambda modules: on_meta.append(all(p.is_meta for m in modules for p in m.parameters())),
    )
    assert on_meta == [True] and not any(p.is_meta for p in model.parameters())
