"""Data preparation at scale: a synthetic corpus of GB_TOTAL GB in FILES files (.txt and .jsonl), tokenized by
`nanoseek data prepare` with 1 and 2 worker threads, at a quarter and at the full size, each in its own process:
throughput (MB/s), peak resident memory (kernel's ru_maxrss of the child) and the time to the first training step
on the prepared shards. The old path (whole corpus as Python lists, commit 2fafce7) runs where it can still fit:
on OLD_MB of the corpus.

    .venv/bin/python benchmarks/data_prep.py --out /tmp/data-bench            # 1 GB: about 9 minutes on 2 cores
    .venv/bin/python benchmarks/data_prep.py --out /tmp/data-bench --gb 0.1   # a quick look
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

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "2fafce7"


def synthetic_corpus(directory: Path, total_bytes: int, files: int, seed: int = 0) -> list[Path]:
    """Zipf-distributed words in sentences, lines and paragraphs: text a BPE tokenizer compresses like prose."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ta", "ru", "shi", "po", "de", "an", "or", "el", "us", "ith", "ent"]
    vocabulary = np.array(["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(20000)])
    weights = 1 / np.arange(1, len(vocabulary) + 1)
    weights /= weights.sum()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(files):
        path = directory / (f"part{index:03d}.jsonl" if index % 2 else f"part{index:03d}.txt")
        with open(path, "w") as f:
            written = 0
            while written < total_bytes // files:
                words = vocabulary[rng.choice(len(vocabulary), size=4000, p=weights)]
                lines = [" ".join(words[i: i + 12]).capitalize() + "." for i in range(0, 4000, 12)]
                text = "\n".join(lines)
                chunk = json.dumps({"text": text}) + "\n" if index % 2 else text + "\n\n"
                f.write(chunk)
                written += len(chunk)
        paths.append(path)
    return paths


def run_child(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds, peak resident MiB, stdout) of a child process; ru_maxrss of RUSAGE_CHILDREN is the largest child
    so far, so each measurement runs in a fresh grandchild under `python -c`."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
               "print(r.stdout[-3000:]); print(r.stderr[-3000:], file=sys.stderr); sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    first, _, rest = result.stdout.partition("\n")
    seconds, peak = map(float, first.split())
    return seconds, peak, rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/nanoseek-data-bench")
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size")
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--old-mb", type=int, default=25, help="corpus size the old path runs on")
    args = parser.parse_args()
    out = Path(args.out)
    corpus = out / "corpus"
    if not corpus.exists():
        start = time.perf_counter()
        synthetic_corpus(corpus, int(args.gb * 1e9), args.files)
        print(f"generated {args.gb} GB in {args.files} files in {time.perf_counter() - start:.0f} s", flush=True)
    files = sorted(corpus.iterdir())
    quarter = files[: max(1, len(files) // 4)]
    nanoseek = [sys.executable, "-m", "nanoseek"]
    env = {**os.environ, "TQDM_DISABLE": "1", "NANOSEEK_CACHE": str(out / "cache")}

    tokenizer = out / "tokenizer.json"
    trainer = ("import sys; from pathlib import Path; from nanoseek.data.sources import sample_texts; "
               "from nanoseek.data.tokenizer import train_tokenizer; "
               "files = sorted(Path(sys.argv[1]).iterdir()); "
               "train_tokenizer(sample_texts(files, 64 << 20, 'text'), 4096).save(sys.argv[2])")
    seconds, peak, _ = run_child([sys.executable, "-c", trainer, str(corpus), str(tokenizer)], env)
    train_seconds = seconds
    print(f"tokenizer (4096 tokens) trained on a 64 MB sample of all {len(files)} files: {seconds:.1f} s, "
          f"peak {peak:.0f} MiB", flush=True)
    results: dict[str, dict[str, float]] = {}
    for label, subset in (("quarter", quarter), ("full", files)):
        size = sum(f.stat().st_size for f in subset) / 1e6
        for workers in (1, 2):
            target = out / f"prepared-{label}-{workers}"
            shutil.rmtree(target, ignore_errors=True)
            seconds, peak, _ = run_child([*nanoseek, "data", "prepare", "--data", *map(str, subset), "--out",
                                          str(target), "--tokenizer", str(tokenizer)],
                                         {**env, "RAYON_NUM_THREADS": str(workers)})
            results[f"{label}-{workers}"] = {"mb": size, "seconds": seconds, "mb_per_s": size / seconds,
                                             "peak_mib": peak, "workers": workers}
            print(f"{label} ({size:,.0f} MB), {workers} worker(s): {size / seconds:.2f} MB/s "
                  f"({size / seconds / workers:.2f} per core), peak {peak:.0f} MiB", flush=True)
    micro = ["model.hidden_size=64", "model.num_hidden_layers=2", "train.batch_size=4", "train.eval_batches=1",
             "--max-steps", "1"]
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    seconds, peak, _ = run_child([*nanoseek, "train", "--data", str(out / "prepared-full-2"), "--out", str(run),
                                  *micro], env)
    results["first_step_prepared"] = {"seconds": seconds, "peak_mib": peak}
    print(f"train --data PREPARED_DIR to the first step (and its checkpoint): {seconds:.1f} s, peak {peak:.0f} MiB")

    small = out / "small.txt"  # what the old path can still hold: its lists of ints take ~200 bytes per token
    with open(small, "wb") as target:
        for f in files:
            if f.suffix == ".txt":
                target.write(f.read_bytes()[: args.old_mb * 10**6 - target.tell()])
            if target.tell() >= args.old_mb * 10**6:
                break
    old_src = out / "old-src"
    if not old_src.exists():
        old_src.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, "src"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
    for side, extra_env in (("old", {"PYTHONPATH": str(old_src / "src")}), ("new", {})):
        shutil.rmtree(out / f"run-{side}", ignore_errors=True)
        shutil.rmtree(out / "cache", ignore_errors=True)
        seconds, peak, _ = run_child([*nanoseek, "train", "--data", str(small), "--out", str(out / f"run-{side}"),
                                      "--tokenizer", str(tokenizer), *micro], {**env, **extra_env})
        results[f"first_step_{side}_{args.old_mb}mb"] = {"seconds": seconds, "peak_mib": peak}
        print(f"{side} path, train --data {args.old_mb} MB .txt to the first step: {seconds:.1f} s, "
              f"peak {peak:.0f} MiB", flush=True)
    results["tokenizer_seconds"] = {"seconds": train_seconds}
    (out / "data_prep.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
