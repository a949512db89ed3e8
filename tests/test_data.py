"""Data at scale: prepared shards hold exactly the ids of direct tokenization, an interrupted preparation resumes to
identical shards, every input format reads the same documents, mixture weights show in the batches, malformed rows
are reported with their position, and a document mask keeps packed documents apart."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

import nanoseek
from helpers import tiny_config
from nanoseek.cli import main
from nanoseek.data import prepare as prepare_module
from nanoseek.data import sources as sources_module
from nanoseek.data.dataset import Prepared, TokenDataset
from nanoseek.data.prepare import PrepareOptions, prepare
from nanoseek.data.sources import CorpusError, Source
from nanoseek.data.tokenizer import END_OF_TEXT, train_tokenizer

WORDS = "to be or not that is the question whether tis nobler in the mind suffer slings arrows".split()


def _documents(count: int, seed: int = 0) -> list[str]:
    """Text with the whitespace a chunker could get wrong: runs of spaces and newlines, indented lines."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(rng.integers(2, 30))]
        docs.append(rng.choice(["\n", "\n\n", "\n  ", " \n\t"]).join(lines) + f" {i}é日本")
    return docs


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_documents(200), 300)


def _eot(tokenizer) -> int:
    return tokenizer.token_to_id(END_OF_TEXT)


def test_shards_hold_the_ids_of_direct_tokenization(tmp_path, tokenizer, monkeypatch):
    """JSONL documents and a .txt file read in many small pieces: the shards are [EOT] + ids of each whole
    document, in order, with a segment start at each document."""
    monkeypatch.setattr(sources_module, "TEXT_PIECE_BYTES", 512)
    monkeypatch.setattr(prepare_module, "HELD_OUT_BYTES", 0)  # whole documents, so that nothing is cut
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 2000)
    docs = _documents(40)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]))
    book = "\n".join(docs[30:])  # one long document
    (tmp_path / "b.txt").write_text(book)
    manifest = prepare(
        [tmp_path / "a.jsonl", tmp_path / "b.txt"],
        tokenizer,
        tmp_path / "out",
        PrepareOptions(val_fraction=0.0, shard_tokens=700),
    )
    assert manifest["dtype"] == "uint16" and len(manifest["train"]) > 3  # several shards
    train = Prepared(tmp_path / "out").train
    expected, starts = [], []
    for doc in docs[:30] + [book]:
        starts.append(len(expected))
        expected += [_eot(tokenizer)] + tokenizer.encode(doc).ids
    assert train.read(0, len(train)).tolist() == expected
    assert train.starts.tolist() == starts


def test_an_interrupted_preparation_resumes_to_identical_shards(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(sources_module, "TEXT_PIECE_BYTES", 512)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 2000)
    lines = [json.dumps({"text": d}) for d in _documents(60)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:5] + ["{broken"] + lines[5:]) + "\n")  # counted once
    (tmp_path / "b.txt").write_text("\n".join(_documents(20, seed=1)))
    files, options = [tmp_path / "a.jsonl", tmp_path / "b.txt"], PrepareOptions(shard_tokens=800)
    prepare(files, tokenizer, tmp_path / "straight", options, progress=False)
    real_read_units, seen = prepare_module.read_units, []

    def dying_read_units(*args):
        for unit in real_read_units(*args):
            seen.append(unit)
            if len(seen) == 70:
                raise KeyboardInterrupt  # a preemption in the middle of the .txt file
            yield unit

    monkeypatch.setattr(prepare_module, "read_units", dying_read_units)
    with pytest.raises(KeyboardInterrupt):
        prepare(files, tokenizer, tmp_path / "resumed", options, progress=False)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not partial["complete"] and partial["train"] and partial["next"][0] == 1  # some shards done
    monkeypatch.setattr(prepare_module, "read_units", real_read_units)
    prepare(files, tokenizer, tmp_path / "resumed", options, progress=False)
    straight = {p.name: p.read_bytes() for p in (tmp_path / "straight").iterdir()}
    resumed = {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir()}
    assert straight == resumed
    assert json.loads(straight["manifest.json"])["skipped"] == 1


def test_every_format_reads_the_same_documents(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = _documents(25)
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    (tmp_path / "c.jsonl").write_bytes(lines)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"id": list(range(25)), "text": docs}), tmp_path / "c.parquet", row_group_size=7)
    streams = []
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        prepare([tmp_path / name], tokenizer, tmp_path / name.replace(".", "_"), progress=False)
        prepared = Prepared(tmp_path / name.replace(".", "_"))
        streams.append(
            (prepared.train.read(0, len(prepared.train)).tolist(), prepared.val.read(0, len(prepared.val)).tolist())
        )
    assert all(stream == streams[0] for stream in streams[1:])
    assert len(streams[0][0]) > 500
    # a directory, a glob and a YAML mixture name the same files
    (tmp_path / "mix.yaml").write_text(
        f"- path: {tmp_path / 'c.jsonl.gz'}\n  weight: 3\n- path: {tmp_path}/*.parquet\n"
    )
    assert sources_module.parse_sources([str(tmp_path / "mix.yaml")]) == [
        Source(str(tmp_path / "c.jsonl.gz"), 3.0),
        Source(f"{tmp_path}/*.parquet", 1.0),
    ]
    assert sources_module.source_files(f"{tmp_path}/*.parquet") == [tmp_path / "c.parquet"]
    assert len(sources_module.source_files(str(tmp_path))) == 4


def test_mixture_weights_show_in_the_batches(tmp_path):
    """Two sources of disjoint tokens, weighted 0.7 / 0.3: the share of rows from the first is 0.7 within 4σ."""
    tokenizer = train_tokenizer(["aaaa bbbb " * 50, "zzzz yyyy " * 50], 270)
    (tmp_path / "a.txt").write_text("aaaa bbbb " * 3000)
    (tmp_path / "z.txt").write_text("zzzz yyyy " * 3000)
    dataset = TokenDataset.build(
        [Source(str(tmp_path / "a.txt"), 0.7), Source(str(tmp_path / "z.txt"), 0.3)], tokenizer, progress=False
    )
    a_ids, z_ids = (torch.from_numpy(np.unique(s.train.read(0, len(s.train)))) for s in dataset.sources)
    rows = torch.cat([dataset.batch("train", 32, 16, seed=1, step=step)[0] for step in range(50)])
    from_a, from_z = torch.isin(rows, a_ids).all(dim=1), torch.isin(rows, z_ids).all(dim=1)
    assert (from_a != from_z).all()  # every row comes whole from one source
    share = from_a.float().mean().item()
    assert abs(share - 0.7) < 4 * math.sqrt(0.7 * 0.3 / len(rows)), share


def test_malformed_rows_are_reported_with_their_position(tmp_path, tokenizer, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [json.dumps({"text": d}) for d in _documents(30)]
    (tmp_path / "bad.jsonl").write_text("\n".join(good[:2] + ['{"text": 3}', "{broken"] + good[2:]) + "\n")
    manifest = prepare([tmp_path / "bad.jsonl"], tokenizer, tmp_path / "lenient", progress=False)
    assert manifest["skipped"] == 2
    assert manifest["problems"] == [
        f"{tmp_path / 'bad.jsonl'}:3: 'text' is not a string",
        f"{tmp_path / 'bad.jsonl'}:4: not a JSON object with a 'text' field",
    ]
    with pytest.raises(CorpusError, match=f"{tmp_path / 'bad.jsonl'}:3: 'text' is not a string"):
        prepare([tmp_path / "bad.jsonl"], tokenizer, tmp_path / "strict", PrepareOptions(strict=True), False)
    pq.write_table(pa.table({"text": ["one", None, "three"]}), tmp_path / "rows.parquet")
    with pytest.raises(CorpusError, match="rows.parquet, row 2: 'text' is NoneType"):
        prepare([tmp_path / "rows.parquet"], tokenizer, tmp_path / "pq", PrepareOptions(strict=True), False)
    import zstandard

    packed = zstandard.ZstdCompressor().compress("".join(line + "\n" for line in good).encode())
    (tmp_path / "cut.jsonl.zst").write_bytes(packed[: len(packed) // 2])  # a download cut short
    with pytest.raises(CorpusError, match="cut.jsonl.zst:1: unreadable .the zstd stream is truncated"):
        prepare([tmp_path / "cut.jsonl.zst"], tokenizer, tmp_path / "zst", PrepareOptions(strict=True), False)
    (tmp_path / "bad.txt").write_bytes(b"fine text\n" * 10 + b"\xff\xfe broken")
    with pytest.raises(CorpusError, match=r"bad.txt, byte 100: not UTF-8 text"):
        prepare([tmp_path / "bad.txt"], tokenizer, tmp_path / "txt", PrepareOptions(strict=True), False)
    code = main(
        [
            "data",
            "prepare",
            "--data",
            str(tmp_path / "bad.jsonl"),
            "--out",
            str(tmp_path / "cli"),
            "--strict",
            "--vocab-size",
            "300",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl:3: 'text' is not a string" in err[0]


def test_windows_at_document_starts_and_the_document_mask(tmp_path, tokenizer):
    """Windows aligned to documents start at one (with its EOT) or a whole number of windows into it, and every
    such start is drawn, so a document longer than a window is trained on all through; attention under the
    document mask makes a packed document's logits those of the document alone (RoPE scores depend on relative
    positions only)."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents(50)))
    dataset = TokenDataset.build([Source(str(tmp_path / "d.jsonl"))], tokenizer, progress=False)
    shards = dataset.sources[0].train
    aligned = {
        int(s) + k * 24
        for s, e in zip(shards.starts, [*shards.starts[1:], len(shards)])
        for k in range(len(shards))
        if s + k * 24 < e and s + k * 24 <= len(shards) - 25
    }
    rng = np.random.default_rng(0)
    drawn = {shards.window_start(rng, 25, at_starts=True) for _ in range(40 * len(aligned))}
    assert drawn == aligned and any(start not in set(shards.starts.tolist()) for start in drawn)
    x, _, _ = dataset.batch("train", 64, 24, seed=0, step=3, at_document_starts=True)
    assert (x[:, 0] == _eot(tokenizer)).any()  # some at a document's start
    x, _, documents = dataset.batch("train", 16, 200, seed=0, step=3)
    crossing = documents[:, 0] < documents[:, -1]  # windows over two documents: their tokens after the EOT
    assert crossing.any() and all(
        (x[row, documents[row] > documents[row, 0]][0] == _eot(tokenizer)).item() for row in crossing.nonzero()[:, 0]
    )
    torch.manual_seed(0)
    for config in (
        tiny_config(vocab_size=320, num_nextn_predict_layers=1),
        nanoseek.preset("tiny-dense").replace(
            vocab_size=320,
            hidden_size=32,
            num_hidden_layers=2,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        ),
    ):
        model = nanoseek.build_model(config).eval()
        first, second = torch.randint(0, 320, (1, 7)), torch.randint(0, 320, (1, 9))
        packed = torch.cat([first, second], dim=1)
        segments = torch.tensor([[0] * 7 + [1] * 9])
        with torch.no_grad():
            together = model(packed, documents=segments)
            alone = model(second)
            unmasked = model(packed)
        torch.testing.assert_close(together[:, 7:], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(unmasked[:, 7:], alone, atol=1e-3)
        targets = torch.roll(packed, -1, dims=1)
        assert model(packed, targets, documents=segments).mtp_loss is not None or not config.num_nextn_predict_layers


def test_train_reads_prepared_directories_and_mixtures(tmp_path, capsys):
    """`data prepare` ahead, then `train --data DIR:W OTHER:W` (the tokenizer comes from the prepared directory)."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents(120)))
    (tmp_path / "b.txt").write_text("\n".join(_documents(60, seed=2)))
    assert (
        main(
            [
                "data",
                "prepare",
                "--data",
                str(tmp_path / "a.jsonl"),
                "--out",
                str(tmp_path / "a_prep"),
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    assert "prepared" in capsys.readouterr().out
    micro = [
        "model.hidden_size=32",
        "model.num_hidden_layers=1",
        "model.max_position_embeddings=32",
        "train.seq_len=16",
        "train.batch_size=4",
        "train.eval_batches=1",
        "--max-steps",
        "2",
        "train.window_starts=documents",
        "train.document_mask=true",
    ]
    assert (
        main(
            [
                "train",
                "--data",
                f"{tmp_path / 'a_prep'}:0.8",
                f"{tmp_path / 'b.txt'}:0.2",
                "--out",
                str(tmp_path / "run"),
                *micro,
            ]
        )
        == 0
    )
    run_tokenizer = (tmp_path / "run" / "tokenizer.json").read_text()
    assert run_tokenizer == (tmp_path / "a_prep" / "tokenizer.json").read_text()
    assert (
        main(
            ["train", "--data", str(tmp_path / "b.txt"), "--out", str(tmp_path / "run"), "--resume", "--max-steps", "3"]
        )
        == 2
    )  # resuming on other data is refused
    assert "the run trained on" in capsys.readouterr().err
