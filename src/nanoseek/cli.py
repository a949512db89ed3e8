"""nanoseek command line. User errors (NanoseekError) print one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.errors import ConfigError, NanoseekError


def resolve_config(spec: str) -> ModelConfig:
    """A preset name, a config.json file, or a model directory holding one."""
    if spec in PRESETS:
        return ModelConfig.preset(spec)
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
    from nanoseek.flops import model_stats

    config = resolve_config(args.model)
    stats = model_stats(config, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
        return
    print(f"{'component':<16}{'total':>10}{'active':>10}")
    for name, count in stats.components.items():
        print(f"{name:<16}{_human(count):>10}{_human(stats.active_components[name]):>10}")
    print(f"{'model':<16}{_human(stats.total_params):>10}{_human(stats.active_params):>10}")
    print(f"MTP modules: {_human(stats.mtp_params)} as stored ({_human(stats.mtp_unique_params)} of their own)")
    print(f"training FLOPs/token at seq {stats.seq_len}: {_human(stats.flops_per_token)} "
          f"(+{_human(stats.mtp_flops_per_token)} MTP)")
    print(f"KV cache/token (bf16): MLA {stats.kv_bytes_per_token:,} B vs MHA {stats.kv_bytes_per_token_mha:,} B "
          f"= {100 * stats.kv_cache_ratio:.2f}%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3-style models: train, inspect, serve")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="parameters, FLOPs and KV-cache size of a model")
    info.add_argument("model", help="preset name, config.json or model directory")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for the attention FLOPs")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except NanoseekError as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
    return 0
