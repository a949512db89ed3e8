"""Checkpoints and prepared data survive a crash at the worst moment, and what they list is never used as a path
unchecked (issue 44, item 11); SFT data with numbers Python will not convert is one clear line."""

from __future__ import annotations

import json
import os

import pytest

from nanoseek.data import prepare as prepare_module
from nanoseek.data.prepare import PrepareOptions, prepare, read_manifest
from nanoseek.data.sources import CorpusError
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.post.sft_data import SftDataError, read_conversations
from nanoseek.train.checkpoint import list_checkpoints


def test_a_replacement_cut_between_its_renames_is_recovered(tmp_path):
    """_move_into_place moves step_N aside before renaming its replacement in: a crash in between left only
    .old-step_N, which was not listed (the run resumed from an older checkpoint, or from nothing)."""
    for name in ("step_0000010", ".old-step_0000020", ".tmp-step_0000030"):
        (tmp_path / name).mkdir()
    (tmp_path / ".old-step_0000020" / "trainer.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000010", "step_0000020"]
    assert (tmp_path / "step_0000020" / "trainer.json").exists()
    assert not (tmp_path / ".old-step_0000020").exists()


def test_checkpoints_sort_by_step_past_seven_digits(tmp_path):
    for name in ("step_9999999", "step_10000000", "step_0000005", "step_notanumber"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005", "step_9999999", "step_10000000"]


def test_the_manifest_is_synced_and_its_shard_names_checked(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    tokenizer = train_tokenizer([corpus.read_text()], 280)
    synced = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(prepare_module.os, "fsync", fsync)
    out = tmp_path / "prepared"
    prepare([corpus], tokenizer, out, PrepareOptions(), progress=False)
    assert any(path.endswith(".manifest.json.tmp") for path in synced)  # the manifest's bytes, before the rename
    assert str(out) in synced  # and the directory, after it
    manifest = json.loads((out / "manifest.json").read_text())
    for bad in ("../../etc/passwd", "/tmp/x", "train_00000/../../x", "train_1"):
        manifest["train"][0]["name"] = bad
        (out / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CorpusError, match="damaged"):
            read_manifest(out)


def test_sft_data_with_a_huge_integer_is_one_line(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}], "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(SftDataError, match="line 1: not JSON"):
        read_conversations(data)
