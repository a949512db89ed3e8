"""Corpus → sharded token files, streamed: units are encoded in batches (tiktoken where it gives the tokenizer's
exact ids, else the tokenizers library; see encoder.py) while the next batch is read, and written straight to
`train_NNNNN.bin` / `val_NNNNN.bin` (uint16 when the vocabulary fits, else uint32), each with `.starts.npy`: where
its segments (documents, or the parts of one a split holds) begin. Memory is two batches of units and one shard,
whatever the corpus size.

`manifest.json` is the source of truth: a shard counts once the manifest lists it, and the manifest also records
where the corpus was read up to, so an interrupted preparation (a kill, or a stop asked by `train`'s SIGTERM
handler) resumes there and ends with the same shards as an uninterrupted one.

Validation, for corpora of at least HELD_OUT_BYTES: whole documents, chosen before reading (the manifest's plan): a
seeded val_fraction of the JSONL lines and parquet rows, and of the .txt files (a document each) when there are
enough of them for that share; with fewer, each .txt file's last val_fraction of pieces. Smaller corpora give the
last val_fraction of each unit's tokens instead, so that both splits exist however few documents there are.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from nanoseek.data.encoder import Encoder, corpus_encoder, encode_stream
from nanoseek.data.sources import CorpusError, Problems, Unit, read_units, suffix_of
from nanoseek.data.tokenizer import end_of_text_id
from nanoseek.errors import RunInterrupted

MANIFEST = "manifest.json"
FORMAT = 2  # 2: validation holds whole .txt documents (1: 64 KiB pieces of them)
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
    if not isinstance(manifest, dict) or manifest.get("format") not in (1, FORMAT):  # 1's shards read the same
        raise CorpusError(f"{directory / MANIFEST} is not a nanoseek token manifest (format {FORMAT})")
    for split in ("train", "val"):
        entries = manifest.get(split)
        if not isinstance(entries, list) or not all(_is_shard_entry(e, split) for e in entries):
            raise CorpusError(
                f"{directory / MANIFEST} is damaged: '{split}' must list shards named {split}_NNNNN "
                "with their token counts"
            )
    return manifest


def _is_shard_entry(entry: Any, split: str) -> bool:
    """A shard's name is used as a path: only the names prepare() writes (no separators, no '..')."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return False
    number = entry["name"].removeprefix(f"{split}_")
    return (
        number != entry["name"]
        and len(number) == 5
        and number.isascii()
        and number.isdigit()
        and isinstance(entry.get("tokens"), int)
        and not isinstance(entry["tokens"], bool)
        and entry["tokens"] >= 0
    )


def _hash(*key: int) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest(), "little")


def held_out_plan(files: list[Path], sizes: list[int], options: PrepareOptions) -> dict[str, Any] | None:
    """Which documents validation holds, fixed before reading (None: each unit's tail, for a small corpus)."""
    if sum(sizes) < HELD_OUT_BYTES:
        return None
    texts = [i for i, f in enumerate(files) if suffix_of(f) == ".txt"]
    whole = round(options.val_fraction * len(texts))
    if whole:
        ranked = sorted(texts, key=lambda i: _hash(options.seed, i))
        return {"txt": texts, "txt_whole": sorted(ranked[:whole]), "txt_tail_from": {}}
    return {
        "txt": texts,
        "txt_whole": [],  # the pieces from this byte on
        "txt_tail_from": {str(i): sizes[i] - int(options.val_fraction * sizes[i]) for i in texts},
    }


def _held_out(plan: dict[str, Any], unit: Unit, options: PrepareOptions) -> bool:
    if unit.file_index not in plan["txt"]:  # a JSONL line or parquet row: a document of its own
        return _hash(options.seed, unit.file_index, unit.number) < options.val_fraction * 2**64
    if plan["txt_whole"]:
        return unit.file_index in plan["txt_whole"]
    return unit.offset >= plan["txt_tail_from"][str(unit.file_index)]


class _Split:
    """One split's pending tokens and segment starts, flushed to a shard file."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype
        self.parts: list[np.ndarray] = []
        self.starts: list[int] = []
        self.tokens = 0
        self.previous: tuple[int, int] | None = None  # (file, unit) whose part ended this split at its unit's end

    def add(self, ids: np.ndarray, unit: Unit, begins_unit: bool, ends_unit: bool) -> None:
        if not len(ids):
            return
        continues = begins_unit and self.previous == (unit.file_index, unit.number - 1) and not unit.first
        if not continues:
            self.starts.append(self.tokens)
        self.parts.append(ids.astype(self.dtype))
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


def prepare(
    files: list[Path],
    tokenizer: Tokenizer,
    out: Path,
    options: PrepareOptions = PrepareOptions(),
    progress: bool = True,
    encoder: Encoder | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Tokenizes `files` into `out` (resuming a preparation that was interrupted) and returns its manifest. `stop`
    is asked after each batch: when it says so, RunInterrupted is raised (the shards written so far are kept)."""
    identity = {
        "format": FORMAT,
        "tokenizer": tokenizer_digest(tokenizer),
        "files": fingerprint(files),
        "options": asdict(options),
    }
    manifest = read_manifest(out)
    if manifest is not None and {k: manifest.get(k) for k in identity} != identity:
        raise CorpusError(f"{out} holds tokens of another corpus, tokenizer or options; choose another directory")
    if manifest is not None and manifest["complete"]:
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        tokenizer.save(str(out / "tokenizer.json"))
        sizes = [f["bytes"] for f in identity["files"]]
        manifest = {
            **identity,
            "dtype": "uint16" if tokenizer.get_vocab_size() <= 1 << 16 else "uint32",
            "held_out": held_out_plan(files, sizes, options),
            "next": [0, 0],
            "train": [],
            "val": [],
            "skipped": 0,
            "complete": False,
        }
    dtype = np.dtype(manifest["dtype"])
    splits = {name: _Split(name, dtype) for name in ("train", "val")}
    for name, previous in manifest.get("previous", {}).items():  # a resumed preparation continues its segments
        splits[name].previous = tuple(previous) if previous else None
    problems = Problems(options.strict)
    problems.count, problems.examples = manifest["skipped"], manifest.get("problems", [])
    eot = [i for i in (end_of_text_id(tokenizer),) if i is not None]  # [] or [its id]
    bar = tqdm(
        total=sum(f["bytes"] for f in identity["files"]),
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=None if progress else True,
        leave=False,
    )  # None: shown on a terminal only
    units = read_units(files, options.text_field, problems, tuple(manifest["next"]))
    encoder = encoder or corpus_encoder(tokenizer)
    try:
        for batch, encoded in encode_stream(units, encoder, BATCH_CHARS):
            for unit, ids in zip(batch, encoded):
                _route(
                    np.concatenate((eot, ids)) if unit.first and eot else ids,
                    unit,
                    splits,
                    manifest["held_out"],
                    options,
                )
            bar.update(sum(len(u.text) for u in batch))
            manifest["next"] = [batch[-1].file_index, batch[-1].number + 1]
            if splits["train"].tokens >= options.shard_tokens:
                _flush(splits, out, manifest, problems)
            if stop():
                raise RunInterrupted(
                    f"stopped while tokenizing the corpus into {out}; its shards so far are kept: "
                    "run the same command again to go on from them"
                )
    finally:
        bar.close()
        encoder.close()
    if not sum(s["tokens"] for s in manifest["train"]) and not splits["train"].tokens:  # nothing is marked done
        raise CorpusError(
            f"the corpus ({', '.join(str(f) for f in files[:3])}) holds no text"
            + (f"; {problems.summary()}" if problems.count else "")
        )
    manifest["complete"] = True
    _flush(splits, out, manifest, problems)
    return manifest


def _route(
    ids: np.ndarray, unit: Unit, splits: dict[str, _Split], plan: dict[str, Any] | None, options: PrepareOptions
) -> None:
    """A unit's tokens to validation (whole, if its document is held out) or split: most to training, the tail to
    validation."""
    if plan is not None:
        splits["val" if _held_out(plan, unit, options) else "train"].add(ids, unit, True, True)
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
    with open(tmp, "w") as f:  # on the disk before it replaces the old one: a power loss keeps one whole manifest
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)
    descriptor = os.open(out, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # and so does the rename
    finally:
        os.close(descriptor)
