"""Serving under load: the same request mix sent over HTTP, with bounded concurrency, to several OpenAI-compatible
servers of one run directory, one after another in this run.

Sides (each started, warmed up, measured, stopped):
  - nanoseek: `nanoseek serve RUN` (continuous batching, paged latent cache, prefix caching, MTP speculation);
  - nanoseek-static: `nanoseek serve RUN --batching static --no-speculation` (the previous server's policy: a new
    batch only when the running one has finished);
  - transformers: `transformers serve RUN --device cpu` (its own OpenAI-compatible server, without
    --continuous-batching: in transformers 5.24 that mode fails for DeepseekV3 with "index_copy_(): Source/destination
    tensor must have same slice shapes", because its paged cache expects per-head keys);
  - any `--side NAME=COMMAND` (COMMAND with {run} and {port}), e.g. an older nanoseek checkout.

The mix: prompts cut from the run's corpus, short and long, a third of them behind one shared preamble (a system
prompt), with output lengths from short to long; greedy, every request streamed. Reported per side: output tokens/s
(tokens counted by re-tokenizing the text with the run's tokenizer, the same for every side), time to first token
and time per output token (p50, p99). Run alone on the machine.

    .venv/bin/python benchmarks/serve_load.py runs/tiny --requests 48 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

SIDES = {
    "nanoseek": "{python} -m nanoseek serve {run} --port {port}",
    "nanoseek-static": "{python} -m nanoseek serve {run} --port {port} --batching static --no-speculation",
    "transformers": "{transformers} serve {run} --device cpu --port {port}",
}


def workload(run: Path, requests: int, seed: int) -> list[dict]:
    from nanoseek.data.sources import default_corpus_files
    from nanoseek.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(run / "tokenizer.json")
    context = json.loads((run / "config.json").read_text())["max_position_embeddings"]
    text = default_corpus_files()[0].read_text(encoding="utf-8")
    rng = random.Random(seed)
    preamble = text[5000 : 5000 + 600]
    mix = []
    for _ in range(requests):
        short = rng.random() < 0.5
        start = rng.randrange(10000, len(text) - 5000)
        prompt = text[start : start + (rng.randint(40, 120) if short else rng.randint(300, 700))]
        if rng.random() < 1 / 3:
            prompt = preamble + prompt
        max_tokens = rng.choice([16, 32, 64, 96])
        ids = tokenizer.encode(prompt).ids
        keep = context - max_tokens - 8
        if len(ids) > keep:  # fit the context: keep the end (and so the shared preamble only if it fits)
            prompt = tokenizer.decode(ids[-keep:])
        mix.append({"prompt": prompt, "max_tokens": max_tokens})
    return mix


async def one_request(client: httpx.AsyncClient, url: str, model: str, item: dict) -> dict:
    body = {
        "model": model,
        "prompt": item["prompt"],
        "max_tokens": item["max_tokens"],
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first, text = None, []
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0].get("text") or ""
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
    return {
        "ttft": first if first is not None else time.perf_counter() - start,
        "text": "".join(text),
        "latency": time.perf_counter() - start,
    }


async def drive(url: str, model: str, mix: list[dict], concurrency: int) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def bounded(item: dict) -> dict:
            async with gate:
                return await one_request(client, url, model, item)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(item) for item in mix))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(name: str, command: str, run: Path, mix: list[dict], concurrency: int) -> dict:
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.infer.launch import free_port, wait_until_up

    port = free_port()
    python = shlex.quote(sys.executable)
    transformers = shlex.quote(str(Path(sys.executable).with_name("transformers")))
    argv = shlex.split(command.format(python=python, transformers=transformers, run=shlex.quote(str(run)), port=port))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    model = str(run) if name == "transformers" else run.resolve().name
    try:
        wait_until_up(process, f"{base}/v1/models", 180)
        asyncio.run(drive(f"{base}/v1/completions", model, mix[:2], 2))  # warm-up (and transformers' lazy load)
        results, seconds = asyncio.run(drive(f"{base}/v1/completions", model, mix, concurrency))
    finally:
        process.terminate()
        process.wait(timeout=60)
    tokenizer = load_tokenizer(run / "tokenizer.json")
    tokens = [len(tokenizer.encode(r["text"]).ids) for r in results]
    tpot = [(r["latency"] - r["ttft"]) / (n - 1) for r, n in zip(results, tokens) if n > 1]
    ttft = [r["ttft"] for r in results]
    return {
        "output_tokens": sum(tokens),
        "seconds": seconds,
        "output_tokens_per_s": sum(tokens) / seconds,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": percentile(ttft, 0.99),
        "tpot_p50_s": statistics.median(tpot),
        "tpot_p99_s": percentile(tpot, 0.99),
        "texts": [r["text"] for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a trained run directory (model + tokenizer.json)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="nanoseek,nanoseek-static,transformers")
    parser.add_argument(
        "--side",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another server; COMMAND may use {python}, {run} and {port}",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sides = {name: SIDES[name] for name in args.sides.split(",") if name}
    sides.update(dict(extra.split("=", 1) for extra in args.side))
    mix = workload(args.run, args.requests, args.seed)
    results = {}
    for name, command in sides.items():
        print(f"{name}: {len(mix)} requests, {args.concurrency} at a time ...", flush=True)
        results[name] = measure(name, command, args.run, mix, args.concurrency)
    reference = results.get("transformers") or next(iter(results.values()))
    print(
        f"\n| side ({args.requests} requests, concurrency {args.concurrency}) | output tok/s | vs transformers | "
        "TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) |\n|---|---|---|---|---|"
    )
    for name, r in results.items():
        print(
            f"| {name} | {r['output_tokens_per_s']:.1f} | "
            f"{r['output_tokens_per_s'] / reference['output_tokens_per_s']:.2f}× | "
            f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
            f"{1000 * r['tpot_p50_s']:.0f} / {1000 * r['tpot_p99_s']:.0f} |"
        )
    if "nanoseek" in results and "transformers" in results:
        same = sum(a == b for a, b in zip(results["nanoseek"]["texts"], results["transformers"]["texts"]))
        print(f"\nnanoseek and transformers returned the same greedy text for {same}/{len(mix)} requests")
    if args.json:
        args.json.write_text(
            json.dumps({k: {m: v for m, v in r.items() if m != "texts"} for k, r in results.items()}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
