"""DeepSeek Sparse Attention measured: V3 against V3.2 in the same engine, on this machine, side by side in one run.

Speed: two models of one shape (random weights: speed does not depend on them), the second with V3.2's lightning
indexer (top 2048 tokens per query, DeepSeek's). The shape keeps V3's proportions where decode spends its time at
long context: per cached token and layer, the latent is 4.5x the indexer key (V3: 576 vs 128 values) and absorbed
MLA does 17x the indexer's multiply-adds (16 heads x (2·256 + 32) vs 8 x 64; V3: 128 x 1,088 vs 64 x 128). For each
context L: the time to prefill one prompt of L tokens, and decode tokens/s of a batch of sequences at context L
(greedy; the time of decode steps only).

Quality: DeepSeek's path at CPU scale. A tiny V3 run (256-token context) is extended to a long context with YaRN
(`train --from --context`), converted to V3.2 (`--dsa warmup`, then `--dsa sparse`, keeping the top 1/8 of the
context), and its held-out bits per byte at that context are compared with its V3 parent's and with the parent
trained densely for the same extra steps. Every run is seeded; the held-out split is the corpus's validation split.

    .venv/bin/python benchmarks/sparse_attention.py            # writes docs/bench/sparse_attention.json
    .venv/bin/python benchmarks/sparse_attention.py --quick    # a smoke test of every part (minutes)

Run alone on the machine. The script restarts itself with glibc's allocator told to keep freed memory
(ALLOCATOR): a CPU has no caching allocator like CUDA's, so every large context gather would be a fresh mmap whose
page faults dominate a decode step (measured: 1 min 41 s of system time in the speed part, against 2 s), and they
hit V3's larger gathers hardest (its 16K decode measured anywhere from 52 to 116 tok/s across runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanoseek.checkpoint.hf import load_pretrained
from nanoseek.config import DeepseekV3Config, ModelConfig
from nanoseek.data.tokenizer import load_tokenizer, token_byte_lengths
from nanoseek.flops import model_stats
from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.request import SamplingParams
from nanoseek.models.registry import build_model
from nanoseek.train.config import TrainConfig
from nanoseek.train.data import run_dataset, run_sources
from nanoseek.train.heldout import held_out_loss

ROOT = Path(__file__).resolve().parent.parent
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
SPEED_SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=16,
    q_lora_rank=128,
    kv_lora_rank=256,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    num_nextn_predict_layers=0,
)
INDEXER = dict(index_n_heads=8, index_head_dim=64, index_topk=2048)


def _engine(config: ModelConfig, seed: int) -> Engine:
    model = build_model(config).eval()
    model.reset_parameters(seed=seed)
    return Engine(model, config=EngineConfig(max_seqs=8, token_budget=1024, speculation=False))


def _prompts(context: int, batch: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (context,), generator=generator).tolist() for _ in range(batch)]


def _prefill_seconds(engine: Engine, prompts: list[list[int]]) -> float:
    """The fastest of the prompts' prefills, one prompt at a time (they are then in the prefix cache)."""
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_new_tokens=1))
        times.append(time.perf_counter() - start)
    return min(times)


def _decode_tokens_per_s(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """The prompts decoded together: once every sequence has its first token (V3's prompts come from the prefix
    cache, V4's are prefilled again, chunk by chunk, so some start decoding sooner), `new_tokens` steps in which
    all of them decode are timed; then they are aborted."""
    budget = engine.config.token_budget
    room = new_tokens + sum(-(-len(p) // budget) for p in prompts) + 2  # enough for the slowest to start
    params = SamplingParams(max_new_tokens=room, min_tokens=room)
    sequences = [engine.add(prompt, params) for prompt in prompts]
    while not all(s.output for s in sequences):
        engine.step()
    start = time.perf_counter()
    for _ in range(new_tokens):
        engine.step()
    elapsed = time.perf_counter() - start
    assert all(s.finish_reason is None for s in sequences), "a sequence finished inside the timed steps"
    for seq in sequences:
        engine.abort(seq)
    while engine.has_work():
        engine.step()
    return new_tokens * len(sequences) / elapsed


def decode_rounds(
    engines: dict[str, Engine], prompts: list[list[int]], new_tokens: int, rounds: int, row: dict
) -> dict[str, list[float]]:
    """Each engine decodes the prompts `rounds` times, the engines taken in alternation (a machine whose speed
    drifts moves every side alike) → every round's tokens/s; `row` gains each engine's median and range."""
    measured: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            measured[name].append(_decode_tokens_per_s(engine, prompts, new_tokens))
    for name, values in measured.items():
        row[f"{name}_decode_tok_s"] = statistics.median(values)
        row[f"{name}_decode_tok_s_range"] = [min(values), max(values)]
    return measured


def speed(contexts: list[int], batch: int, new_tokens: int, rounds: int, seed: int) -> list[dict]:
    """Per context: both engines prefill the same prompts, then decode them in `rounds` rounds taken in
    alternation (a machine whose speed drifts moves both sides alike); the median round, with the range."""
    dense = DeepseekV3Config(**SPEED_SHAPE, max_position_embeddings=max(contexts) + 4 * new_tokens + 256)
    engines = {"v3": _engine(dense, seed), "v32": _engine(dense.replace(**INDEXER), seed)}
    for engine in engines.values():  # warm-up: allocator, first-call costs
        _decode_tokens_per_s(engine, _prompts(256, 1, dense.vocab_size, seed + 1), 4)
    rows = []
    for context in contexts:
        prompts = _prompts(context, batch, dense.vocab_size, seed)
        row: dict = {"context": context}
        for name, engine in engines.items():
            row[f"{name}_prefill_s"] = _prefill_seconds(engine, prompts)
        measured = decode_rounds(engines, prompts, new_tokens, rounds, row)
        ratios = [b / a for a, b in zip(measured["v3"], measured["v32"])]
        row["decode_speedup"] = statistics.median(ratios)
        row["decode_speedup_range"] = [min(ratios), max(ratios)]
        row["prefill_ratio"] = row["v3_prefill_s"] / row["v32_prefill_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _train(out: Path, *args: str) -> None:
    """One `nanoseek train` (skipped when its model exists: an interrupted benchmark resumes), its output in
    OUT.log."""
    if (out / "model.safetensors").exists():
        return
    command = [sys.executable, "-m", "nanoseek", "train", "--out", str(out), *args]
    print("$ nanoseek", " ".join(command[3:]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


def bits_per_byte(run: Path, seq_len: int) -> float:
    model = load_pretrained(run, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(run / "tokenizer.json")
    cfg = TrainConfig(seq_len=seq_len, tokenizer=str(run / "tokenizer.json"))
    split = run_dataset(run_sources(None), tokenizer, cfg, progress=False).sources[0].val
    return held_out_loss(model, split, token_byte_lengths(tokenizer), seq_len, batch_size=1).bits_per_byte


def record_bits_per_byte(result: dict, out: Path, names: list[str], context: int) -> None:
    """result[NAME_bpb]: held-out bits per byte of each run out/NAME at `context` tokens."""
    for name in names:
        result[f"{name}_bpb"] = bits_per_byte(out / name, context)
        print(name, result[f"{name}_bpb"], flush=True)


def quality(out: Path, context: int, steps: dict[str, int], seed: int) -> dict:
    """The V3 parent at `context`, its V3.2 child (warm-up, then sparse), and the parent trained on densely for
    the child's sparse steps; every stage seeded alike, held-out bits per byte at `context`."""
    topk = context // 8
    common = ["--seed", str(seed), "--eval-every", "100000", "train.eval_batches=1", "train.log_every=25"]
    long = [*common, "train.batch_size=2", f"train.seq_len={context}"]
    _train(out / "v3-short", "--preset", "tiny", "--max-steps", str(steps["short"]), *common)
    _train(
        out / "v3-long",
        "--from",
        str(out / "v3-short"),
        "--context",
        str(context),
        "--max-steps",
        str(steps["extend"]),
        *long,
        "train.lr=1e-3",
        "train.warmup_steps=10",
    )
    _train(
        out / "v32-warmup",
        "--from",
        str(out / "v3-long"),
        "--dsa",
        "warmup",
        "--max-steps",
        str(steps["warmup"]),
        *long,
        "model.index_n_heads=8",
        "model.index_head_dim=32",
        f"model.index_topk={topk}",
        "train.lr=1e-3",
        "train.warmup_steps=10",
    )
    sparse_settings = ["--max-steps", str(steps["sparse"]), *long, "train.lr=3e-4", "train.warmup_steps=10"]
    _train(out / "v32-sparse", "--from", str(out / "v32-warmup"), "--dsa", "sparse", *sparse_settings)
    _train(out / "v3-long-continued", "--from", str(out / "v3-long"), *sparse_settings)
    result = {"context": context, "index_topk": topk, "steps": steps, "seed": seed}
    record_bits_per_byte(result, out, ["v3-long", "v32-warmup", "v32-sparse", "v3-long-continued"], context)
    result["v32_vs_parent"] = result["v32-sparse_bpb"] / result["v3-long_bpb"] - 1
    result["v32_vs_continued"] = result["v32-sparse_bpb"] / result["v3-long-continued_bpb"] - 1
    return result


def speed_heading(report: dict, labels: dict[str, str], note: str = "") -> str:
    """The line above a speed table: how decode was measured, and each model's active parameters."""
    active = ", ".join(f"{label} {report['active_params'][name]:,}" for name, label in labels.items())
    return (
        f"Speed (same engine; decode: {report['decode_batch']} sequences at the context{note}, "
        f"{report['new_tokens']} new tokens each, the median of {report['rounds']} alternating rounds [range]; "
        f"active parameters {active}):"
    )


def markdown(report: dict) -> str:
    """The README's tables, from the report."""
    lines = []
    if "speed" in report:
        lines += [
            speed_heading(report, {"v3": "V3", "v32": "V3.2"}),
            "",
            "| context | V3 decode tok/s | V3.2 decode tok/s | decode speed-up | V3 prefill s | V3.2 prefill s |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['context']:,} | {r['v3_decode_tok_s']:.0f} | {r['v32_decode_tok_s']:.0f} | "
            f"{r['decode_speedup']:.2f}x [{r['decode_speedup_range'][0]:.2f}-{r['decode_speedup_range'][1]:.2f}]"
            f" | {r['v3_prefill_s']:.2f} | {r['v32_prefill_s']:.2f} |"
            for r in report["speed"]
        ]
    if "quality" in report:
        q = report["quality"]
        lines += [
            "",
            f"Held-out bits per byte at {q['context']:,} tokens (V3.2 keeps the top {q['index_topk']} "
            f"tokens per query; steps {q['steps']}, seed {q['seed']}):",
            "",
            "| model | bits per byte |",
            "|---|---|",
        ]
        names = {
            "v3-long": "V3 parent (YaRN-extended)",
            "v32-warmup": "V3.2 after the dense warm-up",
            "v32-sparse": "V3.2 after sparse training",
            "v3-long-continued": "V3 parent, same extra steps dense",
        }
        lines += [f"| {label} | {q[f'{name}_bpb']:.4f} |" for name, label in names.items()]
        lines += [
            "",
            f"V3.2 vs its parent: {100 * q['v32_vs_parent']:+.2f} %; vs the parent trained on densely: "
            f"{100 * q['v32_vs_continued']:+.2f} %",
        ]
    return "\n".join(lines) + "\n"


def arguments(name: str, doc: str) -> argparse.Namespace:
    """Restarts the script under ALLOCATOR (once), then the arguments of a long-context benchmark `name`."""
    if any(os.environ.get(key) != value for key, value in ALLOCATOR.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR})
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small contexts and few steps: a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / name)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / f"{name}.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=["speed", "quality"], help="measure only the other part")
    return parser.parse_args()


def write_report(report: dict, table: str, args: argparse.Namespace) -> None:
    """The tables on stdout; a full run also writes the report (JSON) and its tables (.md) beside it."""
    print(table)
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(table)
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")


def main() -> None:
    args = arguments("sparse_attention", __doc__)
    contexts = [512, 1024] if args.quick else [1024, 4096, 16384]
    context = 512 if args.quick else 2048
    steps = (
        dict(short=20, extend=10, warmup=10, sparse=10)
        if args.quick
        else dict(short=600, extend=200, warmup=100, sparse=200)
    )
    report = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "allocator": ALLOCATOR,
        "quick": args.quick,
        "speed_shape": SPEED_SHAPE,
        "indexer": INDEXER,
    }
    if args.skip != "speed":
        dense = DeepseekV3Config(**SPEED_SHAPE, max_position_embeddings=max(contexts) + 256)
        report["active_params"] = {
            "v3": model_stats(dense).active_params,
            "v32": model_stats(dense.replace(**INDEXER)).active_params,
        }
        report["decode_batch"], report["new_tokens"], report["rounds"] = (2, 8, 2) if args.quick else (4, 32, 5)
        report["speed"] = speed(contexts, report["decode_batch"], report["new_tokens"], report["rounds"], args.seed)
    if args.skip != "quality":
        report["quality"] = quality(args.out / ("quick" if args.quick else "full"), context, steps, args.seed)
    write_report(report, markdown(report), args)


if __name__ == "__main__":
    main()
