"""Corpus → sharded token files, streamed: units are encoded in batches (the tokenizers library's parallel
encode_batch) and written straight to `train_NNNNN.bin` / `val_NNNNN.bin` (uint16 when the vocabulary fits, else
uint32), each with `.starts.npy`: where its segments (documents, or the parts of one a split holds) begin. Memory is
one batch of units and one shard, whatever the corpus size.

`manifest.json` is the source of truth: a shard counts once the manifest lists it, and the manifest also records
where the corpus was read up to, so an interrupted preparation resumes there and ends with the same shards as an
uninterrupted one. Validation: for corpora of at least HELD_OUT_BYTES a seeded share of whole units (documents, or
64 KiB pieces of a .txt) is held out; smaller corpora give the last val_fraction of each unit's tokens instead, so
that both splits exist however few documents there are.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from nanoseek.data.sources import CorpusError, Problems, Unit, read_units
from nanoseek.data.tokenizer import end_of_text_id

MANIFEST = "manifest.json"
FORMAT = 1
HELD_OUT_BYTES = 16 << 20
BATCH_CHARS = 1 << 22  # units encoded together (in parallel) at most


@dataclass(frozen=True)
class PrepareOptions:
    text_field: str = "text"
    val_fraction: float = 0.05
    seed: int = 0  # of the held-out units
    strict: bool = False  # a malformed line or row is fatal (else skipped and counted)
    shard_tokens: int = 1 << 24


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def fingerprint(files: list[Path]) -> list[dict[str, Any]]:
    return [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CorpusError(f"{directory / MANIFEST} is damaged: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{directory / MANIFEST} is not a nanoseek token manifest (format {FORMAT})")
    return manifest


def _held_out(seed: int, file_index: int, number: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}/{file_index}/{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


class _Split:
    """One split's pending tokens and segment starts, flushed to a shard file."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype
        self.parts: list[np.ndarray] = []
        self.starts: list[int] = []
        self.tokens = 0
        self.previous: tuple[int, int] | None = None  # (file, unit) whose part ended this split at its unit's end

    def add(self, ids: list[int], unit: Unit, begins_unit: bool, ends_unit: bool) -> None:
        if not ids:
            return
        continues = begins_unit and self.previous == (unit.file_index, unit.number - 1) and not unit.first
        if not continues:
            self.starts.append(self.tokens)
        self.parts.append(np.asarray(ids, dtype=self.dtype))
        self.tokens += len(ids)
        self.previous = (unit.file_index, unit.number) if ends_unit else None

    def flush(self, directory: Path, index: int) -> dict[str, Any]:
        stem = f"{self.name}_{index:05d}"
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        for suffix, array in ((".bin", tokens), (".starts.npy", np.asarray(self.starts, dtype=np.int64))):
            tmp = directory / f".{stem}{suffix}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, array) if suffix.endswith(".npy") else f.write(array.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, directory / f"{stem}{suffix}")
        entry = {"name": stem, "tokens": int(len(tokens)), "segments": len(self.starts)}
        self.parts, self.starts, self.tokens = [], [], 0
        return entry


def prepare(files: list[Path], tokenizer: Tokenizer, out: Path, options: PrepareOptions = PrepareOptions(),
            progress: bool = True) -> dict[str, Any]:
    """Tokenizes `files` into `out` (resuming a preparation that was interrupted) and returns its manifest."""
    identity = {"format": FORMAT, "tokenizer": tokenizer_digest(tokenizer), "files": fingerprint(files),
                "options": asdict(options)}
    manifest = read_manifest(out)
    if manifest is not None and {k: manifest.get(k) for k in identity} != identity:
        raise CorpusError(f"{out} holds tokens of another corpus, tokenizer or options; choose another directory")
    if manifest is not None and manifest["complete"]:
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        tokenizer.save(str(out / "tokenizer.json"))
        total = sum(f["bytes"] for f in identity["files"])
        manifest = {**identity, "dtype": "uint16" if tokenizer.get_vocab_size() <= 1 << 16 else "uint32",
                    "held_out_documents": total >= HELD_OUT_BYTES, "next": [0, 0], "train": [], "val": [],
                    "skipped": 0, "complete": False}
    dtype = np.dtype(manifest["dtype"])
    splits = {name: _Split(name, dtype) for name in ("train", "val")}
    for name, previous in manifest.get("previous", {}).items():  # a resumed preparation continues its segments
        splits[name].previous = tuple(previous) if previous else None
    problems = Problems(options.strict)
    problems.count, problems.examples = manifest["skipped"], manifest.get("problems", [])
    eot = end_of_text_id(tokenizer)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast (tokenizers >= 0.21): no offsets
    bar = tqdm(total=sum(f["bytes"] for f in identity["files"]), unit="B", unit_scale=True, desc="tokenizing",
               disable=None if progress else True, leave=False)  # None: shown on a terminal only
    batch: list[Unit] = []
    chars = 0

    def encode_batch() -> None:
        nonlocal batch, chars
        for unit, encoding in zip(batch, encode([u.text for u in batch], add_special_tokens=False)):
            ids = ([eot] if unit.first and eot is not None else []) + encoding.ids
            _route(ids, unit, splits, manifest["held_out_documents"], options)
        bar.update(chars)
        manifest["next"] = [batch[-1].file_index, batch[-1].number + 1]
        batch, chars = [], 0
        if splits["train"].tokens >= options.shard_tokens:
            _flush(splits, out, manifest, problems)

    for unit in read_units(files, options.text_field, problems, tuple(manifest["next"])):
        batch.append(unit)
        chars += len(unit.text)
        if chars >= BATCH_CHARS:
            encode_batch()
    if batch:
        encode_batch()
    bar.close()
    if not sum(s["tokens"] for s in manifest["train"]) and not splits["train"].tokens:  # nothing is marked done
        raise CorpusError(f"the corpus ({', '.join(str(f) for f in files[:3])}) holds no text"
                          + (f"; {problems.summary()}" if problems.count else ""))
    manifest["complete"] = True
    _flush(splits, out, manifest, problems)
    return manifest


def _route(ids: list[int], unit: Unit, splits: dict[str, _Split], held_out_documents: bool,
           options: PrepareOptions) -> None:
    """A unit's tokens to validation (whole, if held out) or split: most to training, the tail to validation."""
    if held_out_documents:
        held = _held_out(options.seed, unit.file_index, unit.number, options.val_fraction)
        splits["val" if held else "train"].add(ids, unit, True, True)
        return
    cut = len(ids) - max(1, int(len(ids) * options.val_fraction))
    splits["train"].add(ids[:cut], unit, True, cut == len(ids))
    splits["val"].add(ids[cut:], unit, cut == 0, True)


def _flush(splits: dict[str, _Split], out: Path, manifest: dict[str, Any], problems: Problems) -> None:
    """Both splits to new shards, then the manifest (atomically): what it lists is complete and everything before
    `next` is in it."""
    for name, split in splits.items():
        if split.tokens or (manifest["complete"] and not manifest[name]):
            manifest[name].append(split.flush(out, len(manifest[name])))
    manifest["previous"] = {name: split.previous for name, split in splits.items()}
    manifest["skipped"] = problems.count
    manifest["problems"] = problems.examples
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
