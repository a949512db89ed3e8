"""Evidence that the default suite catches a wrong implementation: seven deliberate breaks, each in a copy of the
checkout, each run against the default-run tests of the files that speak for the broken part (after the same
files pass on the unbroken copy). Every mutant must fail at least one test; the report lists which.

    .venv/bin/python tests/mutations.py          # ~1.5 minutes on 2 cores; writes docs/bench/mutations.{md,json}

Not collected by pytest (no test_ prefix): it runs pytest itself, once per mutant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the checkout
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "softmax scale without the RoPE dims (1/sqrt(qk_nope) instead of 1/sqrt(qk_nope + qk_rope))",
        "src/nanoseek/models/common/config.py",
        "scale = self.qk_head_dim**-0.5",
        "scale = self.qk_nope_head_dim**-0.5",
        ("tests/test_parity_hf.py", "tests/test_parity_v32.py"),
    ),
    Mutation(
        "YaRN's attention temperature applied once (mscale, not mscale²)",
        "src/nanoseek/models/common/config.py",
        "scale *= m * m",
        "scale *= m",
        ("tests/test_parity_hf.py", "tests/test_parity_v32.py"),
    ),
    Mutation(
        "MTP's eh_proj input concatenated hidden-first",
        "src/nanoseek/models/deepseek_v3/model.py",
        "torch.cat([self.enorm(next_embeddings), self.hnorm(hidden)], dim=-1)",
        "torch.cat([self.hnorm(hidden), self.enorm(next_embeddings)], dim=-1)",
        ("tests/test_parity_hf.py", "tests/test_checkpoint.py"),
    ),
    Mutation(
        "FP8 block size read off the scale grid (ceil(rows / grid rows)): right for whole blocks, wrong for "
        "an edge block's scale index",
        "src/nanoseek/fp8/quant.py",
        "return scale.repeat_interleave(TILE, -2).repeat_interleave(TILE, -1)[..., :rows, :cols]",
        "return scale.repeat_interleave(-(-rows // scale.shape[-2]), -2).repeat_interleave("
        "-(-cols // scale.shape[-1]), -1)[..., :rows, :cols]",
        ("tests/test_checkpoint.py", "tests/test_fp8.py"),
    ),
    Mutation(
        "V4's attention norm read under transformers' saved name only (attn.norm, not the release's attn.kv_norm)",
        "src/nanoseek/models/deepseek_v4/checkpoint.py",
        'key.rpartition(".attn.kv_norm.")',
        'key.rpartition(".attn.norm.")',
        ("tests/test_release_layouts.py", "tests/test_parity_v4.py"),
    ),
    Mutation(
        "V4's served chunk that begins inside an open compressor window loads none of it",
        "src/nanoseek/models/deepseek_v4/paged.py",
        "ring = torch.arange(p - p % self.rate, p, device=self.entries.device) % self.rate",
        "ring = torch.arange(p, p, device=self.entries.device) % self.rate",
        ("tests/test_v4_serving.py", "tests/test_parity_v4.py"),
    ),
    Mutation(
        "V4's prefix-cache snapshot keeps the window's keys but not the compressors' open windows",
        "src/nanoseek/models/deepseek_v4/paged.py",
        "return [self.keys] + [t for c in (self.compressor, self.indexer) if c is not None for t in c.state_tensors()]",
        "return [self.keys]",
        ("tests/test_v4_serving.py", "tests/test_parity_v4.py"),
    ),
]


def _copy_checkout(into: Path) -> None:
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)


def run_tests(checkout: Path, tests: tuple[str, ...]) -> dict:
    """The default-run tests of `tests` on `checkout`'s sources (PYTHONPATH puts them before the installed ones,
    for the server and torchrun children too)."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    summary = re.findall(r"(\d+) (passed|failed|error)", done.stdout.splitlines()[-1] if done.stdout else "")
    counts = {kind: int(n) for n, kind in summary}
    failed = [line.split(" ")[1] for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {
        "exit": done.returncode,
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0),
        "failing": failed,
        "seconds": round(time.monotonic() - start, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="nanoseek-mutant-") as tmp:
        for mutation in [None, *MUTATIONS]:
            checkout = Path(tmp) / str(len(results))
            _copy_checkout(checkout)
            tests = tuple(sorted({t for m in MUTATIONS for t in m.tests})) if mutation is None else mutation.tests
            if mutation is not None:
                source = checkout / mutation.path
                text = source.read_text()
                if text.count(mutation.old) != 1:
                    raise SystemExit(f"mutations.py: {mutation.path} no longer holds {mutation.old!r} exactly once")
                source.write_text(text.replace(mutation.old, mutation.new))
            outcome = run_tests(checkout, tests)
            results.append(
                {
                    "mutation": "none (the checkout as it is)" if mutation is None else mutation.name,
                    "file": None if mutation is None else mutation.path,
                    "tests": list(tests),
                    **outcome,
                }
            )
            print(
                f"{results[-1]['mutation']}: {outcome['failed']} failed, {outcome['passed']} passed "
                f"({outcome['seconds']} s)",
                flush=True,
            )
            shutil.rmtree(checkout)
    baseline, mutants = results[0], results[1:]
    caught = baseline["failed"] == 0 and baseline["exit"] == 0 and all(m["failed"] > 0 for m in mutants)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutations.json").write_text(
        json.dumps({"caught_every_mutant": caught, "runs": results}, indent=2) + "\n"
    )
    lines = [
        "# Mutation check of the default suite",
        "",
        f"Written by `tests/mutations.py`. Every mutant caught: **{'yes' if caught else 'NO'}**.",
        "",
        "| mutation | file | tests run | failed / passed | first failing tests |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        names = ", ".join(f"`{n.split('::', 1)[1]}`" for n in r["failing"][:3]) + (
            " …" if len(r["failing"]) > 3 else ""
        )
        lines.append(
            f"| {r['mutation']} | {r['file'] or '–'} | {', '.join(Path(t).name for t in r['tests'])} | "
            f"{r['failed']} / {r['passed']} | {names or '–'} |"
        )
    (args.out / "mutations.md").write_text("\n".join(lines) + "\n")
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main())
