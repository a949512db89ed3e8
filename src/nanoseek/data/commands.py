"""`nanoseek data prepare`: a corpus tokenized ahead of training into sharded token files that `train --data DIR`
reads (and that several runs, or a mixture, can share)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from nanoseek.errors import NanoseekError


def cmd_prepare(args: argparse.Namespace) -> None:
    from nanoseek.data.encoder import ENCODERS, corpus_encoder, default_workers
    from nanoseek.data.prepare import PrepareOptions, prepare
    from nanoseek.data.sources import parse_sources, sample_texts, source_files
    from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer

    workers = args.workers or default_workers()
    if workers < 1 or args.encoder not in ENCODERS:
        raise NanoseekError(f"--workers must be >= 1 and --encoder one of {', '.join(ENCODERS)}")
    os.environ["RAYON_NUM_THREADS"] = str(workers)  # tokenizers' thread pool, read when it first starts
    sources = parse_sources(args.data)
    if any(s.weight != 1.0 for s in sources):
        raise NanoseekError(
            "weights mix prepared sources at training time: prepare each source into its own "
            "directory, then `nanoseek train --data A_DIR:0.7 B_DIR:0.3`"
        )
    files = [f for s in sources for f in source_files(s.spec)]
    size = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = train_tokenizer(
            sample_texts(files, args.tokenizer_sample_mb << 20, args.text_field), args.vocab_size
        )
        print(
            f"tokenizer: {tokenizer.get_vocab_size()} tokens, trained on up to {args.tokenizer_sample_mb} MB "
            f"in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    options = PrepareOptions(text_field=args.text_field, val_fraction=args.val_fraction, strict=args.strict)
    tokenizing = time.perf_counter()
    encoder = corpus_encoder(tokenizer, args.encoder, workers)
    manifest = prepare(files, tokenizer, Path(args.out), options, encoder=encoder)
    seconds = time.perf_counter() - tokenizing
    tokens = {split: sum(s["tokens"] for s in manifest[split]) for split in ("train", "val")}
    print(
        f"prepared {args.out}: {len(files)} files, {size / 1e6:,.1f} MB → {tokens['train']:,} training and "
        f"{tokens['val']:,} validation tokens ({manifest['dtype']}) in {len(manifest['train'])} shards; "
        f"{size / 1e6 / max(seconds, 1e-9):.1f} MB/s ({encoder.name}, {workers} workers)"
    )
    if manifest["skipped"]:
        print(f"skipped {manifest['skipped']} malformed lines/rows, e.g. {manifest['problems'][0]}")


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="corpus tools: `data prepare` tokenizes ahead of training")
    actions = data.add_subparsers(dest="action", required=True)
    prep = actions.add_parser("prepare", help="tokenize a corpus into sharded token files (resumable)")
    prep.add_argument(
        "--data",
        nargs="+",
        required=True,
        help=".txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files, directories or glob patterns",
    )
    prep.add_argument("--out", required=True, help="output directory (train --data DIR reads it)")
    prep.add_argument("--tokenizer", help="a tokenizer.json (default: train one on a sample of the corpus)")
    prep.add_argument("--vocab-size", type=int, default=4096)
    prep.add_argument("--tokenizer-sample-mb", type=int, default=64, help="text the tokenizer is trained on")
    prep.add_argument("--text-field", default="text", help="of .jsonl lines and parquet rows")
    prep.add_argument("--val-fraction", type=float, default=0.05)
    prep.add_argument("--strict", action="store_true", help="stop at a malformed line or row instead of skipping it")
    prep.add_argument(
        "--encoder",
        default="auto",
        help="auto (tiktoken where it gives the tokenizer's exact ids, else tokenizers), tiktoken, or tokenizers",
    )
    prep.add_argument("--workers", type=int, help="encoding threads (default: every core this process may use)")
    prep.set_defaults(run=cmd_prepare)
