"""Corpus → token ids in memmapped files (made once, then reused), a deterministic train/validation split, and
fixed-length batches addressed by (step, micro-step) so that a resumed run sees exactly the same data."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from nanoseek.data.corpus import CorpusError, read_documents
from nanoseek.data.tokenizer import end_of_text_id


def cache_root() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek"))


def _cache_key(files: list[Path], tokenizer: Tokenizer, options: str) -> str:
    digest = hashlib.sha256(tokenizer.to_str().encode())
    digest.update(options.encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class TokenDataset:
    def __init__(self, directory: Path):
        self.train = np.memmap(directory / "train.bin", dtype=np.uint32, mode="r")
        self.val = np.memmap(directory / "val.bin", dtype=np.uint32, mode="r")

    @classmethod
    def build(cls, files: list[Path], tokenizer: Tokenizer, text_field: str = "text",
              val_fraction: float = 0.05) -> TokenDataset:
        """Tokenizes the corpus (with a progress bar) unless the same files and tokenizer were seen before. Each
        document gives its last `val_fraction` of tokens to validation, so both splits cover every document."""
        directory = cache_root() / "tokens" / _cache_key(files, tokenizer, f"{text_field}|{val_fraction}")
        if not (directory / "val.bin").exists():
            directory.mkdir(parents=True, exist_ok=True)
            eot = end_of_text_id(tokenizer)
            train, val = [], []
            documents = read_documents(files, text_field)
            for doc in tqdm(documents, total=len(files), desc="tokenizing", unit="file", leave=False):
                ids = tokenizer.encode(doc).ids + ([eot] if eot is not None else [])
                cut = len(ids) - max(1, int(len(ids) * val_fraction))
                train.append(ids[:cut])
                val.append(ids[cut:])
            for name, parts in (("train", train), ("val", val)):
                tmp = directory / f".{name}.bin.tmp"
                np.concatenate([np.asarray(p, dtype=np.uint32) for p in parts]).tofile(tmp)
                os.replace(tmp, directory / f"{name}.bin")
        return cls(directory)

    def check(self, seq_len: int) -> None:
        for name, data in (("training", self.train), ("validation", self.val)):
            if len(data) <= seq_len + 1:
                raise CorpusError(f"the {name} split has {len(data)} tokens, too few for sequences of {seq_len}; "
                                  "use more text or a shorter train.seq_len=N")

    def batch(self, split: str, batch_size: int, seq_len: int, seed: int, step: int,
              micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows at offsets drawn from a generator keyed by (seed, step, micro): the data position of a run is
        its step count, so resuming needs no sampler state."""
        data = self.train if split == "train" else self.val
        rng = np.random.default_rng([seed, step, micro, split == "val"])
        offsets = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        windows = np.stack([data[o: o + seq_len + 1] for o in offsets]).astype(np.int64)
        tokens = torch.from_numpy(windows)
        return tokens[:, :-1], tokens[:, 1:]

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training split's token frequencies: the loss of the best model that ignores
        context, the bar a trained model must clear."""
        counts = np.bincount(self.train).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
