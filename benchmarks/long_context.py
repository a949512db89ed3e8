"""DeepSeek-V4 measured at long context: V3, V3.2 and V4 in the same engine, side by side in one run.

Speed: three models of about equal active parameters (random weights: speed does not depend on them): V3's shape of
benchmarks/sparse_attention.py, the same with V3.2's indexer, and a V4 of that width (one CSA and one HCA layer,
a 128-token window, entries of 4 and 128 tokens, the indexer keeping 512 entries as V4-Flash does). For each context
L: the time to prefill one prompt of L tokens, decode tokens/s of a batch of sequences at context L, and the cache
bytes per token (what a sequence of L tokens holds, flops.cache_bytes / L; V4's window and open compressor windows
are bounded, so it falls with L). The same cache figure at the published shapes (V3, V3.2, V4-Flash) at each L.

Quality: a tiny V3 and a tiny V4 of about equal active parameters trained from scratch at a long context for equal
training FLOPs (nanoseek info's count: V4's attention costs less per token, so it trains more steps), held-out bits
per byte at that context. Every run is seeded; the held-out split is the corpus's validation split.

    .venv/bin/python -m benchmarks.long_context           # writes docs/bench/long_context.json (+ .md)
    .venv/bin/python -m benchmarks.long_context --quick   # a smoke test of every part (minutes)

Run alone on the machine (it restarts itself with the allocator settings of benchmarks/sparse_attention.py).
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import torch

from benchmarks.sparse_attention import (
    ALLOCATOR,
    INDEXER,
    SPEED_SHAPE,
    _decode_tokens_per_s,
    _engine,
    _prefill_seconds,
    _prompts,
    _train,
    arguments,
    decode_rounds,
    record_bits_per_byte,
    speed_heading,
    write_report,
)
from nanoseek.config import DeepseekV3Config, DeepseekV4Config, ModelConfig
from nanoseek.flops import cache_bytes, model_stats
from nanoseek.models.deepseek_v4.config import CSA, HCA
from nanoseek.presets import preset

ROOT = Path(__file__).resolve().parent.parent
V4_SPEED_SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=16,
    q_lora_rank=128,
    qk_rope_head_dim=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5,
    num_nextn_predict_layers=0,
    head_dim=64,
    layer_types=(CSA, HCA),
    mlp_layer_types=("hash_moe", "moe"),
    sliding_window=128,
    compress_rate_csa=4,
    compress_rate_hca=128,
    hc_mult=4,
    o_groups=4,
    o_lora_rank=128,
    swiglu_limit=10.0,
    index_n_heads=8,
    index_head_dim=64,
    index_topk=512,
)


def speed_configs(max_len: int) -> dict[str, ModelConfig]:
    dense = DeepseekV3Config(**SPEED_SHAPE, max_position_embeddings=max_len)
    return {
        "v3": dense,
        "v32": dense.replace(**INDEXER),
        "v4": DeepseekV4Config(**V4_SPEED_SHAPE, max_position_embeddings=max_len),
    }


def speed(contexts: list[int], batch: int, new_tokens: int, rounds: int, seed: int) -> list[dict]:
    """Per context: every engine prefills the same prompt (timed), then decodes `batch` prompts in `rounds` rounds
    taken in alternation; the median round, with the range (a round's prefills, from the prefix cache or not, are
    untimed). Past 16K tokens one sequence decodes: V3's and V3.2's prefills grow with the square of the
    context, and each prompt is prefilled once."""
    configs = speed_configs(max(contexts) + 4 * new_tokens + 256)
    engines = {name: _engine(config, seed) for name, config in configs.items()}
    for engine in engines.values():  # warm-up: allocator, first-call costs
        _decode_tokens_per_s(engine, _prompts(256, 1, 4096, seed + 1), 4)
    rows = []
    for context in contexts:
        prompts = _prompts(context, batch if context <= 16384 else 1, 4096, seed)
        row: dict = {"context": context, "decode_batch": len(prompts)}
        for name, engine in engines.items():
            row[f"{name}_prefill_s"] = _prefill_seconds(engine, prompts[:1])
            row[f"{name}_cache_bytes_per_token"] = cache_bytes(configs[name], context) / context
        measured = decode_rounds(engines, prompts, new_tokens, rounds, row)
        for name in ("v32", "v4"):
            ratios = [b / a for a, b in zip(measured["v3"], measured[name])]
            row[f"{name}_decode_speedup"] = statistics.median(ratios)
            row[f"{name}_decode_speedup_range"] = [min(ratios), max(ratios)]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def published_cache(contexts: list[int]) -> list[dict]:
    """Cache bytes per token (bf16) at DeepSeek's shapes, and V4-Flash's share of V3's."""
    shapes = {name: preset(name) for name in ("v3", "v32", "v4-flash")}
    rows = []
    for context in contexts:
        row = {"context": context, **{name: cache_bytes(c, context) / context for name, c in shapes.items()}}
        row["v4_flash_vs_v3"] = row["v4-flash"] / row["v3"]
        rows.append(row)
    return rows


def quality(out: Path, context: int, v3_steps: int, seed: int) -> dict:
    """tiny (V3) and tiny-v4 trained from scratch at `context` for equal training FLOPs, held-out bits per byte."""
    common = [
        "--seed",
        str(seed),
        "--eval-every",
        "100000",
        "train.eval_batches=1",
        "train.log_every=25",
        "train.batch_size=2",
        f"train.seq_len={context}",
        f"model.max_position_embeddings={context}",
        "train.warmup_steps=20",
        "--no-mtp",
    ]
    flops = {
        name: model_stats(
            preset(name).replace(max_position_embeddings=context, vocab_size=4096, num_nextn_predict_layers=0),
            seq_len=context,
        ).flops_per_token
        for name in ("tiny", "tiny-v4")
    }
    steps = {"tiny": v3_steps, "tiny-v4": round(v3_steps * flops["tiny"] / flops["tiny-v4"])}
    result = {
        "context": context,
        "seed": seed,
        "steps": steps,
        "flops_per_token": flops,
        "active_params": {name: model_stats(preset(name)).active_params for name in flops},
    }
    for name, count in steps.items():
        _train(out / name, "--preset", name, "--max-steps", str(count), *common)
    record_bits_per_byte(result, out, list(steps), context)
    result["v4_vs_v3"] = result["tiny-v4_bpb"] / result["tiny_bpb"] - 1
    return result


def markdown(report: dict) -> str:
    lines = []
    if "speed" in report:
        lines += [
            speed_heading(report, {"v3": "V3", "v32": "V3.2", "v4": "V4"}, " (1 past 16K)"),
            "",
            "| context | decode tok/s V3 / V3.2 / V4 | V4 vs V3 | V3.2 vs V3 | prefill s V3 / V3.2 / V4 | "
            "cache B/token V3 / V3.2 / V4 |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["speed"]:
            decode = " / ".join(f"{r[f'{n}_decode_tok_s']:.0f}" for n in ("v3", "v32", "v4"))
            prefill = " / ".join(f"{r[f'{n}_prefill_s']:.2f}" for n in ("v3", "v32", "v4"))
            cache = " / ".join(f"{r[f'{n}_cache_bytes_per_token']:,.0f}" for n in ("v3", "v32", "v4"))
            ratio = {
                n: f"{r[f'{n}_decode_speedup']:.2f}x [{r[f'{n}_decode_speedup_range'][0]:.2f}-"
                f"{r[f'{n}_decode_speedup_range'][1]:.2f}]"
                for n in ("v4", "v32")
            }
            lines.append(f"| {r['context']:,} | {decode} | {ratio['v4']} | {ratio['v32']} | {prefill} | {cache} |")
    if "published_cache" in report:
        lines += [
            "",
            "Cache bytes per token at the published shapes (bf16):",
            "",
            "| context | V3 | V3.2 | V4-Flash | V4-Flash / V3 |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['context']:,} | {r['v3']:,.0f} | {r['v32']:,.0f} | {r['v4-flash']:,.0f} | "
            f"{100 * r['v4_flash_vs_v3']:.1f} % |"
            for r in report["published_cache"]
        ]
    if "quality" in report:
        q = report["quality"]
        lines += [
            "",
            f"Held-out bits per byte at {q['context']:,} tokens after equal training FLOPs (steps "
            f"{q['steps']}, seed {q['seed']}; active parameters {q['active_params']}):",
            "",
            "| model | bits per byte |",
            "|---|---|",
            f"| V3 (tiny) | {q['tiny_bpb']:.4f} |",
            f"| V4 (tiny-v4) | {q['tiny-v4_bpb']:.4f} |",
            "",
            f"V4 vs V3: {100 * q['v4_vs_v3']:+.2f} %",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arguments("long_context", __doc__)
    contexts = [512, 1024] if args.quick else [1024, 4096, 16384, 65536]
    report: dict = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "allocator": ALLOCATOR,
        "quick": args.quick,
        "published_cache": published_cache([4096, 16384, 65536, 131072, 1048576]),
    }
    if args.skip != "speed":
        configs = speed_configs(max(contexts) + 256)
        report["shapes"] = {"v3": SPEED_SHAPE, "v32_indexer": INDEXER, "v4": V4_SPEED_SHAPE}
        report["active_params"] = {name: model_stats(c).active_params for name, c in configs.items()}
        report["decode_batch"], report["new_tokens"], report["rounds"] = (2, 8, 2) if args.quick else (4, 32, 3)
        report["speed"] = speed(contexts, report["decode_batch"], report["new_tokens"], report["rounds"], args.seed)
    if args.skip != "quality":
        report["quality"] = quality(
            args.out / ("quick" if args.quick else "full"),
            256 if args.quick else 1024,
            10 if args.quick else 400,
            args.seed,
        )
    write_report(report, markdown(report), args)


if __name__ == "__main__":
    main()
