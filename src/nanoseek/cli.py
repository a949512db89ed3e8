"""nanoseek command line. User errors (NanoseekError) and the machine's (OSError: a full disk) print one line and exit
2; a run stopped by SIGTERM or Ctrl-C after its checkpoint exits 75, a second Ctrl-C 130; bugs keep their
traceback."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from nanoseek.config import ModelConfig, RopeScaling
from nanoseek.data import commands as data_commands
from nanoseek.device import add_device_options, resolve_device
from nanoseek.errors import EXIT_ABORTED, EXIT_INTERRUPTED, CheckpointError, ConfigError, NanoseekError, RunInterrupted
from nanoseek.infer import commands as infer_commands
from nanoseek.post import commands as post_commands
from nanoseek.presets import PRESETS, preset


def resolve_config(spec: str) -> ModelConfig:
    """A preset name, a config.json file, or a model directory holding one."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ModelConfig.load_json(path)
    raise ConfigError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json or model directory")


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def cmd_info(args: argparse.Namespace) -> None:
    from nanoseek.flops import long_context, model_stats, preset_long_context

    config = resolve_config(args.model)
    stats = model_stats(config, seq_len=args.seq_len)
    # DeepSeek's long-context comparison: this model beside V3 and V3.2 at their published shapes
    contexts = (
        {"this": long_context(config, stats=stats), "v3": preset_long_context("v3"), "v32": preset_long_context("v32")}
        if config.architecture != "llama"
        else {}
    )
    from nanoseek.checkpoint.hf import meta_tensors, weight_bytes
    from nanoseek.parallel.tensor_plan import device_bytes

    tensors = meta_tensors(config)  # built once: the whole model's bytes and a device's share
    weights = weight_bytes(config, tensors)
    size = args.tensor_parallel_size
    device = device_bytes(config, size, tensors) if size is not None else None
    if args.json:
        extra = {"per_device": device} if device is not None else {}
        print(json.dumps({**stats.to_dict(), "weight_bytes": weights, "long_context": contexts, **extra}, indent=2))
        return
    print(f"{'component':<18}{'total':>10}{'active':>10}")
    for name, count in stats.components.items():
        print(f"{name:<18}{_human(count):>10}{_human(stats.active_components[name]):>10}")
    print(f"{'model':<18}{_human(stats.total_params):>10}{_human(stats.active_params):>10}")
    print(f"MTP modules: {_human(stats.mtp_params)} as stored ({_human(stats.mtp_unique_params)} of their own)")
    print(
        f"training FLOPs/token at seq {stats.seq_len}: {_human(stats.flops_per_token)} "
        f"(+{_human(stats.mtp_flops_per_token)} MTP)"
    )
    print(
        f"weights: {weights['bf16'] / 2**30:,.2f} GiB in bf16; {weights['released'] / 2**30:,.2f} GiB "
        f"({weights['released'] / weights['bf16']:.3f}x) as DeepSeek releases this generation quantized, resident "
        "so under serve"
    )
    if device is not None:
        n, held = device["tensor_parallel_size"], device["weight_bytes"]
        caches = device["cache_bytes_per_sequence"]
        print(
            f"per device over {n} (heads, MLPs and vocabulary split, {config.n_routed_experts // n} routed experts "
            f"each, the cache whole on every one): weights {held['released'] / 2**30:,.2f} GiB as released "
            f"({held['bf16'] / 2**30:,.2f} GiB in bf16); one sequence's cache at "
            + " / ".join(f"{int(L):,}" for L in caches)
            + " tokens: "
            + " / ".join(f"{b / 2**30:,.2f}" for b in caches.values())
            + " GiB"
        )
    kind = config.attention_kind
    print(
        f"KV cache/token (bf16): {kind} {stats.kv_bytes_per_token:,} B vs MHA {stats.kv_bytes_per_token_mha:,} B "
        f"= {100 * stats.kv_cache_ratio:.2f}% (GQA, 8 query heads per KV head: {stats.kv_bytes_per_token_gqa:,} B)"
    )
    if contexts:
        print("per token at context L (forward FLOPs of the token at L; cache bytes of an L-token sequence / L):")
        print(f"{'L':>9}{'FLOPs':>10}{'V3':>10}{'V3.2':>10}{'cache B':>10}{'V3':>10}{'V3.2':>10}")
        for row, v3, v32 in zip(*contexts.values()):
            print(
                f"{row['context']:>9,}"
                + "".join(f"{_human(r['flops_per_token']):>10}" for r in (row, v3, v32))
                + "".join(f"{r['cache_bytes_per_token']:>10,.0f}" for r in (row, v3, v32))
            )


# A preset's fields that a run keeps as they are (a run's vocabulary and special tokens come from its tokenizer)
PRESET_SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "architecture",
    "head_dim",
    "layer_types",
    "mlp_layer_types",
    "sliding_window",
    "compress_rate_csa",
    "compress_rate_hca",
    "hc_mult",
    "o_groups",
    "o_lora_rank",
)


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE (e.g. model.hidden_size=256 train.lr=1e-3)")
        out[key] = value
    return out


def _dashed_overrides(extra: list[str]) -> list[str]:
    """`--train.seq_len=64` and `--train.seq_len 64`, as users type them, become `train.seq_len=64`."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if item.startswith(("--train.", "--model.")):
            item = item[2:]
            if "=" not in item and i + 1 < len(extra):
                i += 1
                item = f"{item}={extra[i]}"
        out.append(item)
        i += 1
    return out


_SETTING = re.compile(r"^(model\.|train\.)?[A-Za-z_]\w*=")


def extended_context(config: ModelConfig, tokens: int) -> ModelConfig:
    """V3's context extension (§4.3): YaRN with factor = new context / the context RoPE was trained at (the
    original one of a model extended before), β_fast 32, β_slow 1, mscale 1 on both sides of the softmax scale."""
    original = (
        config.rope_scaling.original_max_position_embeddings if config.rope_scaling else config.max_position_embeddings
    )
    if tokens <= original:
        raise ConfigError(f"--context {tokens} does not extend the model's context of {original} tokens")
    yarn = RopeScaling(
        factor=tokens / original,
        original_max_position_embeddings=original,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
    return config.replace(max_position_embeddings=tokens, rope_scaling=yarn)


def _starting_model(source: Path, preset_name: str | None, overrides: dict[str, Any]) -> ModelConfig:
    """--from: the run takes the source's shape and tokenizer (its weights are loaded once the model is built); the
    settings may only add what the source lacks, e.g. V3.2's indexer."""
    if preset_name:
        raise ConfigError("--from takes the model's shape from MODEL_DIR: drop --preset")
    if not (source / "config.json").is_file() or not (source / "tokenizer.json").is_file():
        raise CheckpointError(f"--from {source}: not a model directory (config.json, weights and tokenizer.json)")
    overrides.setdefault("train.tokenizer", str(source / "tokenizer.json"))
    try:
        return ModelConfig.load_json(source / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{source / 'config.json'}: {e}") from None


def cmd_train(args: argparse.Namespace) -> None:
    from nanoseek.train.config import TrainConfig, apply_overrides, qualified_keys, read_config_file
    from nanoseek.train.trainer import RunSpec, train

    # --data takes several values: KEY=VALUE settings that follow it are settings, not sources
    data = [d for d in args.data or [] if not _SETTING.match(d)] or None
    args.overrides += [d for d in args.data or [] if _SETTING.match(d)]
    overrides = read_config_file(args.config) if args.config else {}
    flags = {
        "train.max_steps": args.max_steps,
        "train.save_every": args.save_every,
        "train.eval_every": args.eval_every,
        "train.seed": args.seed,
        "train.balance": args.balance,
        "train.precision": args.precision,
        "train.dsa": args.dsa,
        "train.tokenizer": args.tokenizer,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if args.no_mtp:
        overrides["train.use_mtp"] = False
    overrides.update(_overrides(args.overrides))
    preset_name = args.preset or "tiny"
    base = preset(preset_name)
    init_from = Path(args.init_from) if args.init_from else None
    if init_from is not None and not args.resume:
        base = _starting_model(init_from, args.preset, overrides)
    if args.context is not None and not args.resume:
        base = extended_context(base, args.context)
        overrides.setdefault("train.seq_len", args.context)
    model_config, train_config = apply_overrides(base, TrainConfig(), overrides)
    if args.dsa and not model_config.sparse_attention and not args.resume:
        raise ConfigError(
            "--dsa trains V3.2's indexer, and this model has none: add one with model.index_n_heads=N "
            "(and model.index_head_dim, model.index_topk), or use --preset tiny-v32"
        )
    explicit = qualified_keys(model_config, train_config, overrides)
    if args.preset:  # on --resume, a preset names the model's shape: it must be the checkpoint's
        explicit |= {f"model.{name}" for name in PRESET_SHAPE_FIELDS}
    out = Path(args.out or f"runs/{preset_name}")
    summary = train(
        RunSpec(
            out,
            model_config,
            train_config,
            data,
            args.resume,
            args.dp,
            args.ep,
            args.pp,
            args.pp_schedule,
            explicit,
            init_from,
        )
    )
    if summary["final"] is None:  # a non-zero rank of a distributed run: rank 0 reports
        return
    final = summary["final"]
    val = final.get("val_loss", float("nan"))
    imbalance = summary["imbalance_last_100"]
    print(
        f"done: {out}  val loss {val:.3f} (unigram entropy {summary['unigram_entropy']:.3f})  "
        f"expert load max/mean over the last 100 steps {imbalance if imbalance is not None else float('nan'):.2f}  "
        f"{final.get('tokens_per_s', 0):.0f} tok/s over the last {final.get('tokens_per_s_steps', 0)} steps"
    )
    print(f"sample it:  nanoseek generate {out} --prompt 'ROMEO.'")


def cmd_export(args: argparse.Namespace) -> None:
    from nanoseek.checkpoint.hf import load_pretrained, save_pretrained
    from nanoseek.data.tokenizer import copy_tokenizer_files
    from nanoseek.train.checkpoint import export_checkpoint

    source, out = Path(args.checkpoint), Path(args.out)
    if (source / "config.json").exists():  # a model or run directory
        written = save_pretrained(load_pretrained(source, device="cpu"), out, fp8=args.fp8)
        copy_tokenizer_files(source, out)
    else:
        written = export_checkpoint(source, out, fp8=args.fp8)
    fp8_count = sum(key.endswith(".weight_scale_inv") for key in written)
    print(
        f"wrote {args.out}"
        + (
            f": {fp8_count} weights in FP8 E4M3 with 128x128 block scales (only weights made of "
            "whole blocks are quantized)"
            if args.fp8
            else ""
        )
    )


def cmd_bench(args: argparse.Namespace) -> None:
    from nanoseek.bench import bench

    bench(
        args.model,
        Path(args.out),
        args.batch,
        args.seq,
        args.steps,
        args.new_tokens,
        args.json,
        *resolve_device(args.device, args.dtype),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek", description="DeepSeek-V3-style models: train, inspect, serve, benchmark"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="parameters, FLOPs and KV-cache size of a model")
    info.add_argument("model", help="preset name, config.json or model directory")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for the attention FLOPs")
    info.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="also what each of N devices holds when the model is split over them (weights, a sequence's cache)",
    )
    info.set_defaults(run=cmd_info)

    train = commands.add_parser("train", help="train a model (default: the tiny preset on Shakespeare)")
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.hidden_size=256 train.lr=1e-3"
    )
    train.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: tiny)")
    train.add_argument("--config", help="YAML or TOML file with 'model' and 'train' sections")
    train.add_argument(
        "--data",
        nargs="+",
        metavar="SOURCE[:WEIGHT]",
        help=".txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files, directories, globs or prepared "
        "directories, each with an optional mixture weight; or a YAML list of {path, weight} "
        "(default: Shakespeare's plays)",
    )
    train.add_argument("--tokenizer", help="a tokenizer.json to use instead of training one")
    train.add_argument("--out", help="run directory (default: runs/PRESET)")
    train.add_argument("--max-steps", type=int)
    train.add_argument("--save-every", type=int)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument(
        "--from",
        dest="init_from",
        metavar="MODEL_DIR",
        help="start from a model directory's weights, tokenizer and shape (model.X may add V3.2's "
        "indexer: model.index_n_heads=...)",
    )
    train.add_argument(
        "--context",
        type=int,
        metavar="TOKENS",
        help="extend the context with YaRN as V3 does (max_position_embeddings and seq_len become "
        "TOKENS, RoPE scaled from the model's original context)",
    )
    train.add_argument(
        "--dsa",
        choices=["warmup", "sparse"],
        help="V3.2's training stage: indexers alone by KL to dense attention, or top-k attention",
    )
    train.add_argument("--no-mtp", action="store_true", help="train without multi-token prediction")
    train.add_argument("--balance", choices=["aux-free", "aux-loss", "none"])
    train.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp8"],
        help="auto: bf16 on GPUs, fp32 on CPUs; fp8: V3's FP8 GEMMs (emulated exactly on CPUs)",
    )
    train.add_argument("--dp", type=int, help="data-parallel ranks under torchrun (default: all processes)")
    train.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (a divisor of --dp)")
    train.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks")
    train.add_argument(
        "--pp-schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved1f1b", "zbv", "dualpipev"]
    )
    train.set_defaults(run=cmd_train)

    export = commands.add_parser("export", help="a training checkpoint (DCP) or a model → HF model directory")
    export.add_argument("checkpoint", help="RUN/checkpoints/step_NNNNNNN, or a run/model directory")
    export.add_argument("out", help="output model directory")
    export.add_argument(
        "--fp8",
        action="store_true",
        help="DeepSeek-V3's FP8 format: E4M3 projections, a weight_scale_inv per 128x128 block",
    )
    export.set_defaults(run=cmd_export)

    bench = commands.add_parser("bench", help="training and decoding speed vs transformers, KV-cache sizes")
    bench.add_argument("model", nargs="?", default="tiny", help="preset (random weights) or run/model directory")
    bench.add_argument("--batch", type=int, default=8, help="training batch")
    bench.add_argument("--seq", type=int, default=256, help="training sequence length")
    bench.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    bench.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per sequence")
    bench.add_argument("--out", default="bench", help="directory for bench.md, bench.json, bench.png")
    bench.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    add_device_options(bench)
    bench.set_defaults(run=cmd_bench)

    infer_commands.register(commands)
    data_commands.register(commands)
    post_commands.register(commands)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"nanoseek: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # a warning is one line too, without the source line under it
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        argv = _dashed_overrides(argv)
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may stand anywhere among train's options (argparse only takes them in one run)
    if args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args)
    except NanoseekError as e:
        return _error(str(e))
    except RunInterrupted as e:
        if str(e):  # only rank 0 of a distributed run says it
            print(f"nanoseek: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\nnanoseek: interrupted", file=sys.stderr)
        return EXIT_ABORTED
    except OSError as e:  # the machine's, not ours: a full disk, a file-size limit, a permission
        return _error(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    return 0


def _error(text: str) -> int:
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())  # parsers write several lines
    print(f"nanoseek: error: {message}", file=sys.stderr)
    return 2
