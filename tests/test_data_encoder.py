"""Preparing a corpus: tiktoken stands in for tokenizers only where it gives the very same ids (shards byte-equal),
validation holds whole documents, and a stop asked during `train`'s tokenization ends it (exit 75, no step)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from nanoseek.cli import main
from nanoseek.data import encoder as encoder_module
from nanoseek.data import prepare as prepare_module
from nanoseek.data import sources as sources_module
from nanoseek.data.dataset import Prepared
from nanoseek.data.encoder import (
    TiktokenEncoder,
    TokenizersEncoder,
    _byte_chars,
    _tiktoken_tables,
    corpus_encoder,
    tiktoken_refusal,
)
from nanoseek.data.prepare import PrepareOptions, prepare
from nanoseek.data.sources import default_corpus_files
from nanoseek.data.tokenizer import END_OF_TEXT, train_tokenizer
from nanoseek.errors import NanoseekError, RunInterrupted

PLAYS = default_corpus_files()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([p.read_text() for p in PLAYS[:4]], 1024)


def _eot(tokenizer) -> list[int]:
    return [tokenizer.token_to_id(END_OF_TEXT)]


def test_tiktoken_gives_the_tokenizers_ids_and_the_same_shards(tmp_path, tokenizer, monkeypatch):
    """On plays the tokenizer never saw (accents, dashes, digits, an end-of-text marker inside the text) both
    encoders give the same ids, and a preparation with either (tiktoken in two worker processes) writes byte-equal
    shards."""
    monkeypatch.setattr(encoder_module, "PARALLEL_CHARS", 0)
    encoder = corpus_encoder(tokenizer)
    assert isinstance(encoder, TiktokenEncoder)
    texts = [p.read_text() for p in PLAYS[10:13]] + [f"naïve café — 1,234.5 {END_OF_TEXT} 日本語 🙂\t\n  x"]
    for ours, theirs in zip(encoder.encode(texts), TokenizersEncoder(tokenizer).encode(texts)):
        assert np.array_equal(ours, theirs) and len(ours) > 5
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[1:]))
    files = [PLAYS[10], tmp_path / "c.jsonl"]
    for name in ("tiktoken", "tokenizers"):
        prepare(files, tokenizer, tmp_path / name, encoder=corpus_encoder(tokenizer, name, workers=2), progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "tiktoken").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "tokenizers").iterdir()
    }


def _bpe(merges: list[tuple[str, str]]) -> Tokenizer:
    vocab = {END_OF_TEXT: 0, **{c: i + 1 for i, c in enumerate(_byte_chars())}}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def test_a_tokenizer_tiktoken_would_encode_otherwise_is_left_to_tokenizers():
    """Merges b+c, a+b, ab+c: tokenizers turns "abc" into [a, bc] (no rule joins a and bc), tiktoken into [abc]
    (the concatenation is a token). The vocabulary check sees it; so does the structure check for a normalizer."""
    odd = _bpe([("b", "c"), ("a", "b"), ("ab", "c")])
    assert tiktoken_refusal(odd) is None  # its structure alone does not tell
    unchecked = TiktokenEncoder(_tiktoken_tables(odd), workers=1)
    assert unchecked.encode(["abc"])[0].tolist() != TokenizersEncoder(odd).encode(["abc"])[0].tolist()
    assert isinstance(corpus_encoder(odd), TokenizersEncoder)
    with pytest.raises(NanoseekError, match="encodes a vocabulary entry otherwise"):
        corpus_encoder(odd, "tiktoken")
    normalized = _bpe([("b", "c")])
    normalized.normalizer = normalizers.NFKC()
    assert tiktoken_refusal(normalized) == "it has a normalizer"
    assert isinstance(corpus_encoder(_bpe([("b", "c"), ("a", "bc")])), TiktokenEncoder)


def _segments(split) -> list[list[int]]:
    tokens = split.read(0, len(split)).tolist()
    bounds = [*split.starts.tolist(), len(tokens)]
    return [tokens[a:b] for a, b in zip(bounds, bounds[1:])]


def test_validation_holds_whole_documents(tmp_path, tokenizer, monkeypatch):
    """Above the held-out size, with .txt files read in many pieces: each .txt document is whole in one split (two
    of eight, at a quarter, held out), as is each JSONL line; with too few .txt files for whole ones, each file's
    last pieces are validation and its first ones training."""
    monkeypatch.setattr(sources_module, "TEXT_PIECE_BYTES", 4096)
    monkeypatch.setattr(prepare_module, "HELD_OUT_BYTES", 0)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 20_000)
    texts = [p.read_text()[:40_000] for p in PLAYS[:8]]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    lines = [p.read_text()[:3000] for p in PLAYS[8:28]]
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    documents = {tuple(_eot(tokenizer) + tokenizer.encode(t).ids) for t in texts + lines}
    files = [tmp_path / f"{i}.txt" for i in range(8)] + [tmp_path / "lines.jsonl"]
    prepare(files, tokenizer, tmp_path / "many", PrepareOptions(val_fraction=0.25), progress=False)
    prepared = Prepared(tmp_path / "many")
    train, val = (set(map(tuple, _segments(s))) for s in (prepared.train, prepared.val))
    assert train | val == documents and not train & val  # every segment a whole document, in one split
    held_txt = [t for t in texts if tuple(_eot(tokenizer) + tokenizer.encode(t).ids) in val]
    assert len(held_txt) == 2 and 0 < len(val) - 2 < len(lines)

    prepare(files[:2], tokenizer, tmp_path / "few", PrepareOptions(val_fraction=0.25), progress=False)
    prepared = Prepared(tmp_path / "few")
    for head, tail, text in zip(_segments(prepared.train), _segments(prepared.val), texts):
        assert head + tail == _eot(tokenizer) + tokenizer.encode(text).ids
        assert 0.1 < len(tail) / (len(head) + len(tail)) < 0.4  # about the last quarter of the pieces


def test_a_stop_during_preparation_keeps_the_shards_and_resumes(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 20_000)
    files, options = PLAYS[:3], PrepareOptions(shard_tokens=5_000)
    prepare(files, tokenizer, tmp_path / "straight", options, progress=False)
    batches = iter(range(100))
    with pytest.raises(RunInterrupted, match="stopped while tokenizing"):
        prepare(files, tokenizer, tmp_path / "stopped", options, progress=False, stop=lambda: next(batches) == 3)
    partial = json.loads((tmp_path / "stopped" / "manifest.json").read_text())
    assert not partial["complete"] and partial["train"]
    prepare(files, tokenizer, tmp_path / "stopped", options, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "straight").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "stopped").iterdir()
    }


def test_sigterm_while_train_tokenizes_stops_before_any_step(tmp_path, monkeypatch, capsys):
    """SIGTERM arrives while `train` prepares its corpus: the preparation ends after its batch, exit 75, no step
    and no checkpoint (before: it waited for the whole corpus, then a step)."""
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 20_000)
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    real_read_units = prepare_module.read_units

    def signalled(*args):
        for number, unit in enumerate(real_read_units(*args)):
            if number == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield unit

    monkeypatch.setattr(prepare_module, "read_units", signalled)
    (tmp_path / "corpus").mkdir()
    for play in PLAYS[:6]:
        (tmp_path / "corpus" / play.name).write_text(play.read_text())
    micro = [
        "model.hidden_size=32",
        "model.num_hidden_layers=1",
        "train.seq_len=16",
        "train.batch_size=2",
        "--max-steps",
        "3",
        "train.vocab_size=300",
    ]
    assert main(["train", "--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "run"), *micro]) == 75
    assert "stopped while tokenizing" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
