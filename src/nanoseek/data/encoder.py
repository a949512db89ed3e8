"""Encoding a corpus with exactly a tokenizer.json's ids, as fast as the machine allows.

HF `tokenizers` encodes real English text at about 1 MB/s per core; tiktoken's BPE (the encoder nanochat uses) runs
the same byte-level BPE several times faster. The two agree when the tokenizer is the kind `nanoseek` trains:
byte-level BPE with GPT-2's split pattern, no normalizer, and merges whose results are numbered in merge order
(tiktoken merges the adjacent pair whose concatenation has the lowest id, tokenizers the pair whose merge rule comes
first). So the tiktoken encoder is built only for such a tokenizer, and only used once it has encoded every
vocabulary entry and a probe text to tokenizers' very ids; anything else is encoded by tokenizers itself. tiktoken
keeps the GIL while it encodes, so its workers are processes (spawned, so safe in a process that runs threads).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from nanoseek.data.sources import Unit
from nanoseek.data.tokenizer import PROBE_TEXT
from nanoseek.errors import NanoseekError

# GPT-2's pre-tokenization, as tokenizers' ByteLevel(use_regex=True) and tiktoken's r50k write it
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENCODERS = ("auto", "tiktoken", "tokenizers")
SLICES_PER_WORKER = 4  # a batch's texts are cut into this many runs per worker, to even out long and short texts
PARALLEL_CHARS = 1 << 20


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TokenizersEncoder:
    """tokenizers' own parallel encode_batch (its thread count: RAYON_NUM_THREADS)."""

    name = "tokenizers"

    def __init__(self, tokenizer: Tokenizer):
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: no offsets

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._encode(texts, add_special_tokens=False)]

    def close(self) -> None:
        pass


class TiktokenEncoder:
    """tiktoken's BPE, in worker processes when there are several (its encoder holds the GIL, so threads would
    take turns); ids straight into numpy. A batch of under PARALLEL_CHARS is encoded here."""

    name = "tiktoken"

    def __init__(self, tables: tuple[dict[bytes, int], dict[str, int]], workers: int):
        self.tables, self.workers = tables, workers
        self.encoding = _encoding(*tables)
        self._pool: ProcessPoolExecutor | None = None

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self.workers == 1 or sum(map(len, texts)) < PARALLEL_CHARS:
            return _encode_run(self.encoding, texts)
        if self._pool is None:  # spawned: a fresh interpreter per worker, safe whatever threads this process runs
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=self.tables,
            )
        step = max(1, -(-len(texts) // (self.workers * SLICES_PER_WORKER)))
        runs = self._pool.map(_encode_in_worker, [texts[i : i + step] for i in range(0, len(texts), step)])
        return [ids for run in runs for ids in run]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _encoding(ranks: dict[bytes, int], special: dict[str, int]) -> Any:
    import tiktoken

    return tiktoken.Encoding("nanoseek", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def _encode_run(encoding: Any, texts: list[str]) -> list[np.ndarray]:
    return [encoding.encode_to_numpy(t, allowed_special="all") for t in texts]


_worker_encoding: Any = None  # a worker process's own


def _start_worker(ranks: dict[bytes, int], special: dict[str, int]) -> None:
    global _worker_encoding
    _worker_encoding = _encoding(ranks, special)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _encode_run(_worker_encoding, texts)


Encoder = TokenizersEncoder | TiktokenEncoder


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character → the byte it stands for."""
    return {char: byte for byte, char in enumerate(_byte_chars())}


def _byte_chars() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def tiktoken_refusal(tokenizer: Tokenizer) -> str | None:
    """Why tiktoken cannot stand in for this tokenizer (None: it can, as far as its structure shows)."""
    spec = json.loads(tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or any(
        model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback")
    ):
        return "its model is not plain BPE"
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    if (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex")) != ("ByteLevel", False, True):
        return "its pre-tokenizer is not byte-level with GPT-2's pattern"
    if any(t["lstrip"] or t["rstrip"] or t["single_word"] for t in spec.get("added_tokens", [])):
        return "an added token strips spaces or matches whole words only"
    if set(_byte_chars()) - set(model["vocab"]):
        return "not every byte is a token"
    ids = [
        model["vocab"].get("".join(pair))
        for pair in (m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"])
    ]
    if None in ids or len(set(ids)) != len(ids) or any(a >= b for a, b in zip(ids, ids[1:])):
        return "its merges' results are not distinct tokens numbered in merge order"
    return None


def _tiktoken_tables(tokenizer: Tokenizer) -> tuple[dict[bytes, int], dict[str, int]]:
    """tiktoken's inputs: each token's bytes → its id (its merge rank), and the special tokens."""
    byte_of = _byte_decoder()
    special = {token.content: index for index, token in tokenizer.get_added_tokens_decoder().items()}
    ranks = {
        bytes(byte_of[c] for c in token): index
        for token, index in tokenizer.get_vocab().items()
        if token not in special
    }
    return ranks, special


def _agrees(encoder: TiktokenEncoder, reference: TokenizersEncoder, texts: list[str]) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(_encode_run(encoder.encoding, texts), reference.encode(texts)))


def vocabulary_texts(ranks: dict[bytes, int]) -> list[str]:
    """Each vocabulary entry's text (those that are whole UTF-8): tiktoken takes a piece that is a token as that
    token, while tokenizers' merges may end elsewhere, so each must encode to the same ids in both."""
    texts = []
    for token in ranks:
        try:
            texts.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def corpus_encoder(tokenizer: Tokenizer, choice: str = "auto", workers: int | None = None) -> Encoder:
    """The encoder a preparation uses: tiktoken where it gives the tokenizer's exact ids (`auto`; `tiktoken` insists
    on it), else tokenizers."""
    if choice not in ENCODERS:
        raise NanoseekError(f"unknown encoder {choice!r}; choose one of {', '.join(ENCODERS)}")
    reference = TokenizersEncoder(tokenizer)
    if choice == "tokenizers":
        return reference
    refusal = tiktoken_refusal(tokenizer)
    if refusal is None:
        try:
            encoder = TiktokenEncoder(_tiktoken_tables(tokenizer), workers or default_workers())
        except ModuleNotFoundError:
            refusal = "tiktoken is not installed"
        else:
            if _agrees(encoder, reference, [PROBE_TEXT, *vocabulary_texts(encoder.tables[0])]):
                return encoder
            refusal = "it encodes a vocabulary entry otherwise than tokenizers does"
    if choice == "tiktoken":
        raise NanoseekError(f"--encoder tiktoken: this tokenizer cannot be encoded by tiktoken exactly: {refusal}")
    return reference


def encode_stream(
    units: Iterable[Unit], encoder: Encoder, batch_chars: int
) -> Iterator[tuple[list[Unit], list[np.ndarray]]]:
    """(batch of units, their ids) in order: batches of about `batch_chars`, each encoded on a thread while the next
    one is read, so reading and parsing the corpus overlaps encoding."""
    with ThreadPoolExecutor(1) as background:
        pending: tuple[list[Unit], Future[list[np.ndarray]]] | None = None
        batch: list[Unit] = []
        chars = 0
        for unit in units:
            batch.append(unit)
            chars += len(unit.text)
            if chars >= batch_chars:
                if pending is not None:
                    yield pending[0], pending[1].result()
                pending = batch, background.submit(encoder.encode, [u.text for u in batch])
                batch, chars = [], 0
        if pending is not None:
            yield pending[0], pending[1].result()
        if batch:
            yield batch, encoder.encode([u.text for u in batch])
