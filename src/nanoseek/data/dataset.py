"""Prepared token shards → training batches. A dataset is one or more prepared sources (a mixture, each drawn with
its weight); a batch is addressed by (seed, step, micro-step), so the data position of a run is its step count and a
resumed run sees exactly the same data. Windows may start anywhere or only at segment (document) starts, and a
batch can carry each token's segment number for a document mask."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from nanoseek.data.prepare import FORMAT, PrepareOptions, fingerprint, prepare, read_manifest, tokenizer_digest
from nanoseek.data.sources import CorpusError, Source, source_files


def cache_root() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek"))


class TokenShards:
    """One split of a prepared directory as a single token stream over its memmapped shards."""

    def __init__(self, directory: Path, split: str, manifest: dict):
        entries = [e for e in manifest[split] if e["tokens"]]
        self.shards = [np.memmap(directory / f"{e['name']}.bin", dtype=manifest["dtype"], mode="r") for e in entries]
        lengths = [len(s) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        starts = [np.load(directory / f"{e['name']}.starts.npy") + base for e, base in zip(entries, self.offsets)]
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self._aligned: dict[int, np.ndarray] = {}  # window length → _aligned_windows

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        out, position = [], start
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while position < start + length:
            local = position - self.offsets[shard]
            piece = self.shards[shard][local : local + start + length - position]
            out.append(piece)
            position += len(piece)
            shard += 1
        return np.concatenate(out).astype(np.int64)

    def segments(self, start: int, length: int) -> np.ndarray:
        """The segment number of each of those tokens (equal numbers: the same document)."""
        return np.searchsorted(self.starts, np.arange(start, start + length), side="right")

    def window_start(self, rng: np.random.Generator, length: int, at_starts: bool) -> int:
        """Where a window of `length` tokens starts: anywhere, or aligned to a document: at its start or a multiple
        of length − 1 after it, so that a document longer than a window is trained on all through, each of its
        tokens the target of one aligned window (one drawn uniformly among all of them)."""
        if at_starts:
            aligned = self._aligned_windows(length)
            if aligned[-1]:
                i = int(rng.integers(0, aligned[-1]))
                segment = int(np.searchsorted(aligned, i, side="right"))
                before = int(aligned[segment - 1]) if segment else 0
                return int(self.starts[segment]) + (i - before) * (length - 1)
        return int(rng.integers(0, len(self) - length + 1))

    def _aligned_windows(self, length: int) -> np.ndarray:
        """Cumulative count, per segment, of the aligned windows that start in it and fit in the stream."""
        if length not in self._aligned:
            ends = np.append(self.starts[1:], len(self))
            last = np.minimum(ends - 1, len(self) - length)  # the latest start in the segment that leaves room
            counts = np.where(last >= self.starts, (last - self.starts) // (length - 1) + 1, 0)
            self._aligned[length] = np.cumsum(counts) if len(counts) else np.zeros(1, np.int64)
        return self._aligned[length]


class Prepared:
    """A prepared directory: its manifest and both splits."""

    def __init__(self, directory: Path):
        manifest = read_manifest(directory)
        if manifest is None or not manifest.get("complete"):
            raise CorpusError(f"{directory} is not a complete prepared corpus (run `nanoseek data prepare`)")
        self.directory, self.manifest = directory, manifest
        self.train, self.val = TokenShards(directory, "train", manifest), TokenShards(directory, "val", manifest)


def is_prepared(spec: str) -> bool:
    return (Path(spec) / "manifest.json").is_file()


def open_source(
    source: Source,
    tokenizer: Tokenizer,
    options: PrepareOptions,
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> Prepared:
    """A prepared directory as it is, or the source prepared into the cache (once: keyed by the files, tokenizer
    and options; `stop` as prepare's)."""
    if is_prepared(source.spec):
        prepared = Prepared(Path(source.spec))
        if prepared.manifest["tokenizer"] != tokenizer_digest(tokenizer):
            raise CorpusError(
                f"{source.spec} was prepared with another tokenizer than this run's (use its "
                "tokenizer.json, or prepare it again)"
            )
        return prepared
    files = source_files(source.spec)
    key = hashlib.sha256(
        json.dumps([FORMAT, tokenizer_digest(tokenizer), asdict(options), fingerprint(files)]).encode()
    )
    directory = cache_root() / "tokens" / key.hexdigest()[:16]
    prepare(files, tokenizer, directory, options, progress, stop=stop)
    return Prepared(directory)


class TokenDataset:
    def __init__(self, sources: list[Prepared], weights: list[float]):
        self.sources = sources
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)

    @classmethod
    def build(
        cls,
        sources: list[Source],
        tokenizer: Tokenizer,
        options: PrepareOptions = PrepareOptions(),
        progress: bool = True,
        stop: Callable[[], bool] = lambda: False,
    ) -> TokenDataset:
        return cls([open_source(s, tokenizer, options, progress, stop) for s in sources], [s.weight for s in sources])

    def check(self, seq_len: int) -> None:
        for prepared in self.sources:
            for name, split in (("training", prepared.train), ("validation", prepared.val)):
                if len(split) <= seq_len + 1:
                    raise CorpusError(
                        f"the {name} split of {prepared.directory} has {len(split)} tokens, too few "
                        f"for sequences of {seq_len}; use more text or a shorter train.seq_len=N"
                    )

    def batch(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int,
        step: int,
        micro: int = 0,
        at_document_starts: bool = False,
        rows: range | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, segment numbers of the inputs), each [batch_size, seq_len], or [len(rows), seq_len]:
        only those rows of the batch are read (a data-parallel rank's share; every row is still drawn, so the
        batch is the same whoever reads which rows). Each row's source is drawn with its weight, then a window of
        it, from a generator keyed by (seed, step, micro, split)."""
        rng = np.random.default_rng([seed, step, micro, split == "val"])
        picks = rng.choice(len(self.sources), size=batch_size, p=self.weights)
        wanted = range(batch_size) if rows is None else rows
        tokens, segments = [], []
        for row, index in enumerate(picks):
            shards = getattr(self.sources[index], split)
            start = shards.window_start(rng, seq_len + 1, at_document_starts)
            if row in wanted:
                tokens.append(shards.read(start, seq_len + 1))
                segments.append(shards.segments(start, seq_len))
        stacked = torch.from_numpy(np.stack(tokens))
        return stacked[:, :-1], stacked[:, 1:], torch.from_numpy(np.stack(segments))

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training tokens' frequencies (the first source's, read in chunks): the loss
        of the best model that ignores context, the bar a trained model must clear."""
        counts = np.zeros(0, np.int64)
        for shard in self.sources[0].train.shards:
            for begin in range(0, len(shard), 1 << 24):
                chunk = np.bincount(shard[begin : begin + (1 << 24)])
                counts = np.pad(counts, (0, max(0, len(chunk) - len(counts))))
                counts[: len(chunk)] += chunk
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
