"""Data preparation on real text. The corpus is the default corpus's plays, their paragraphs shuffled (seeded, anew
for each pass over the plays) into FILES files, half `.txt` and half `.jsonl` (a few paragraphs a line): real
English words, so that no BPE word cache can hide the encoder's work (a corpus of made-up words once measured 4× too
fast). `nanoseek data prepare` runs with each encoder (tiktoken, tokenizers) and 1 and 2 workers, each in a fresh
process: end-to-end MB/s (reading, encoding, writing), per core, and peak resident memory (the kernel's ru_maxrss).
The two encoders' shards are compared byte for byte. Then the default settings on a quarter of the corpus (memory
does not grow with it) and the time to the first training step on the prepared shards.

    .venv/bin/python benchmarks/data_prep.py --out /tmp/data-bench --report docs/bench   # 256 MB: ~12 min, 2 cores
    .venv/bin/python benchmarks/data_prep.py --out /tmp/data-bench --mb 32               # a quick look

Writes REPORT/data_prep.json and REPORT/data_prep.md (REPORT: --report, default --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nanoseek.data.sources import default_corpus_files


def real_text_corpus(directory: Path, total_bytes: int, files: int, seed: int = 0) -> list[Path]:
    """The plays' paragraphs, shuffled pass after pass, dealt into `files` files of about total_bytes / files."""
    paragraphs = [p for play in default_corpus_files() for p in play.read_text().split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths, order = [], iter(())
    for index in range(files):
        path = directory / (f"part{index:03d}.jsonl" if index % 2 else f"part{index:03d}.txt")
        with open(path, "w") as f:
            while f.tell() < total_bytes // files:
                chunk = []
                for _ in range(8):
                    position = next(order, None)
                    if position is None:
                        order = iter(rng.permutation(len(paragraphs)))
                        position = next(order)
                    chunk.append(paragraphs[position])
                text = "\n\n".join(chunk)
                f.write(json.dumps({"text": text}) + "\n" if index % 2 else text + "\n\n")
        paths.append(path)
    return paths


def run_child(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds, peak resident MiB, stdout) of a child process; ru_maxrss of RUSAGE_CHILDREN is the largest child
    so far, so each measurement runs in a fresh grandchild under `python -c`."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
        "print(r.stdout[-3000:]); print(r.stderr[-3000:], file=sys.stderr); sys.exit(r.returncode)"
    )
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    first, _, rest = result.stdout.partition("\n")
    seconds, peak = map(float, first.split())
    return seconds, peak, rest


def same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".bin", ".npy"))
    return names == sorted(p.name for p in b.iterdir() if p.suffix in (".bin", ".npy")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/nanoseek-data-bench"))
    parser.add_argument("--report", type=Path, help="where data_prep.json / .md go (default: --out)")
    parser.add_argument("--mb", type=int, default=256, help="corpus size (MB)")
    parser.add_argument("--files", type=int, default=32)
    args = parser.parse_args()
    out, report = args.out, args.report or args.out
    corpus = out / f"corpus-{args.mb}mb-{args.files}"
    if not corpus.exists():
        start = time.perf_counter()
        real_text_corpus(corpus, args.mb * 10**6, args.files)
        print(f"wrote {args.mb} MB of shuffled plays in {args.files} files in {time.perf_counter() - start:.0f} s")
    files = sorted(corpus.iterdir())
    size = sum(f.stat().st_size for f in files) / 1e6
    nanoseek = [sys.executable, "-m", "nanoseek"]
    env = {**os.environ, "TQDM_DISABLE": "1", "NANOSEEK_CACHE": str(out / "cache")}

    tokenizer = out / "tokenizer.json"
    trainer = (
        "import sys; from pathlib import Path; from nanoseek.data.sources import sample_texts; "
        "from nanoseek.data.tokenizer import train_tokenizer; "
        "files = sorted(Path(sys.argv[1]).iterdir()); "
        "train_tokenizer(sample_texts(files, 64 << 20, 'text'), 4096).save(sys.argv[2])"
    )
    seconds, peak, _ = run_child([sys.executable, "-c", trainer, str(corpus), str(tokenizer)], env)
    results: dict[str, dict] = {"tokenizer": {"seconds": seconds, "peak_mib": peak, "vocab": 4096, "sample_mb": 64}}
    print(f"tokenizer (4096 tokens) trained on a 64 MB sample: {seconds:.1f} s, peak {peak:.0f} MiB", flush=True)

    def prepare(label: str, subset: list[Path], *options: str) -> dict[str, float]:
        target = out / f"prepared-{label}"
        shutil.rmtree(target, ignore_errors=True)
        mb = sum(f.stat().st_size for f in subset) / 1e6
        seconds, peak, _ = run_child(
            [
                *nanoseek,
                "data",
                "prepare",
                "--data",
                *map(str, subset),
                "--out",
                str(target),
                "--tokenizer",
                str(tokenizer),
                *options,
            ],
            env,
        )
        print(f"{label} ({mb:,.0f} MB): {mb / seconds:.2f} MB/s, peak {peak:.0f} MiB", flush=True)
        return {"mb": mb, "seconds": seconds, "mb_per_s": mb / seconds, "peak_mib": peak}

    for encoder in ("tiktoken", "tokenizers"):
        for workers in (1, 2):
            row = prepare(f"{encoder}-{workers}", files, "--encoder", encoder, "--workers", str(workers))
            results[f"{encoder}-{workers}"] = {
                **row,
                "encoder": encoder,
                "workers": workers,
                "mb_per_s_per_core": row["mb_per_s"] / workers,
            }
    results["identical_shards"] = {
        "tiktoken_vs_tokenizers": same_shards(out / "prepared-tiktoken-2", out / "prepared-tokenizers-2")
    }
    results["default-quarter"] = prepare("default-quarter", files[: max(1, len(files) // 4)])
    results["default-full"] = prepare("default-full", files)

    micro = [
        "model.hidden_size=64",
        "model.num_hidden_layers=2",
        "train.batch_size=4",
        "train.eval_batches=1",
        "--max-steps",
        "1",
    ]
    shutil.rmtree(out / "run", ignore_errors=True)
    seconds, peak, _ = run_child(
        [*nanoseek, "train", "--data", str(out / "prepared-default-full"), "--out", str(out / "run"), *micro], env
    )
    results["first_step_prepared"] = {"seconds": seconds, "peak_mib": peak}
    print(f"train --data PREPARED_DIR to the first step (and its checkpoint): {seconds:.1f} s, peak {peak:.0f} MiB")
    write_report(report, results, size, args)


def write_report(report: Path, results: dict, size: float, args: argparse.Namespace) -> None:
    rows = [
        "| `nanoseek data prepare` | 1 worker | 2 workers (per core) | peak memory, 1 / 2 workers |",
        "|---|---|---|---|",
    ]
    for encoder in ("tiktoken", "tokenizers"):
        one, two = results[f"{encoder}-1"], results[f"{encoder}-2"]
        rows.append(
            f"| `--encoder {encoder}` | {one['mb_per_s']:.2f} MB/s | {two['mb_per_s']:.2f} MB/s "
            f"({two['mb_per_s_per_core']:.2f}) | {one['peak_mib']:.0f} / {two['peak_mib']:.0f} MiB |"
        )
    quarter, full = results["default-quarter"], results["default-full"]
    speedup = results["tiktoken-2"]["mb_per_s"] / results["tokenizers-2"]["mb_per_s"]
    lines = [
        f"{size:,.0f} MB of the plays' paragraphs, shuffled, in {args.files} files (half .txt, half .jsonl); "
        "each run a fresh process on this machine; end to end (read, encode, write shards):",
        "",
        *rows,
        "",
        f"tiktoken / tokenizers at 2 workers: {speedup:.2f}×; their shards byte-identical: "
        f"{results['identical_shards']['tiktoken_vs_tokenizers']}.",
        f"Default settings (`auto` encoder, every core): {quarter['mb']:,.0f} MB at {quarter['mb_per_s']:.2f} "
        f"MB/s ({quarter['peak_mib']:.0f} MiB peak), {full['mb']:,.0f} MB at {full['mb_per_s']:.2f} MB/s "
        f"({full['peak_mib']:.0f} MiB peak). Tokenizer (4,096 tokens, 64 MB sample): "
        f"{results['tokenizer']['seconds']:.1f} s. `train --data PREPARED_DIR` to its first step: "
        f"{results['first_step_prepared']['seconds']:.1f} s ({results['first_step_prepared']['peak_mib']:.0f} "
        "MiB peak).",
    ]
    report.mkdir(parents=True, exist_ok=True)
    (report / "data_prep.json").write_text(
        json.dumps(
            {"settings": {"mb": args.mb, "files": args.files, "cores": len(os.sched_getaffinity(0))}, **results},
            indent=2,
        )
        + "\n"
    )
    (report / "data_prep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
