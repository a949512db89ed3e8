"""A run's data: its sources (files, directories, globs, prepared directories, a weighted mixture), its tokenizer
(given, the one a prepared directory was made with, or trained on a bounded sample of the corpus) and the token
dataset, prepared once into the cache and reused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

from nanoseek.data.dataset import TokenDataset, is_prepared
from nanoseek.data.prepare import PrepareOptions, tokenizer_digest
from nanoseek.data.sources import DEFAULT, Source, parse_sources, sample_texts, source_files
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.train.config import TrainConfig


def run_sources(data: list[str] | None) -> list[Source]:
    return parse_sources(data) if data else [Source(DEFAULT)]


def same_sources(a: list[str] | None, b: list[str] | None) -> bool:
    """Whether two --data values name the same sources (paths compared resolved)."""

    def normalized(data: list[str] | None) -> list[tuple[str, float]]:
        return [(s.spec if s.spec == DEFAULT else str(Path(s.spec).resolve()), s.weight) for s in run_sources(data)]

    return normalized(a) == normalized(b)


def run_tokenizer(sources: list[Source], cfg: TrainConfig) -> tuple[Tokenizer, bool]:
    """→ (tokenizer, whether it was trained here). Prepared directories bring their own; they must agree."""
    prepared = [Path(s.spec) / "tokenizer.json" for s in sources if is_prepared(s.spec)]
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer), False
    if prepared:
        tokenizers = [load_tokenizer(path) for path in prepared]
        if len({tokenizer_digest(t) for t in tokenizers}) > 1:
            raise NanoseekError(
                "the prepared sources were made with different tokenizers; prepare them with one (--tokenizer)"
            )
        return tokenizers[0], False
    files = [f for s in sources for f in source_files(s.spec)]
    return train_tokenizer(sample_texts(files, cfg.tokenizer_sample_mb << 20, cfg.text_field), cfg.vocab_size), True


def prepare_options(cfg: TrainConfig) -> PrepareOptions:
    return PrepareOptions(text_field=cfg.text_field, strict=cfg.strict_data)


def run_dataset(
    sources: list[Source],
    tokenizer: Tokenizer,
    cfg: TrainConfig,
    progress: bool,
    stop: Callable[[], bool] = lambda: False,
) -> TokenDataset:
    dataset = TokenDataset.build(sources, tokenizer, prepare_options(cfg), progress, stop)
    dataset.check(cfg.seq_len)
    return dataset
