"""The training loader: a data-parallel rank reads only its rows of the global batch (the same rows the whole batch
has), and the loader serves every (step, micro-step) in order, read ahead on its thread."""

from __future__ import annotations

import dataclasses

import torch

from nanoseek.data.dataset import TokenDataset
from nanoseek.data.sources import Source, default_corpus_files
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.parallel.setup import Parallelism
from nanoseek.train.config import TrainConfig
from nanoseek.train.loader import BatchLoader, local_batch


def _dataset(tmp_path) -> TokenDataset:
    play = default_corpus_files()[0]
    tokenizer = train_tokenizer([play.read_text()], 300)
    return TokenDataset.build(
        [Source(str(play)), Source(str(default_corpus_files()[1]), 0.5)], tokenizer, progress=False
    )


def test_a_rank_reads_its_rows_of_the_global_batch(tmp_path):
    dataset = _dataset(tmp_path)
    for documents in (False, True):
        whole = dataset.batch("train", 6, 16, 7, 3, 1, at_document_starts=documents)
        part = dataset.batch("train", 6, 16, 7, 3, 1, at_document_starts=documents, rows=range(2, 4))
        assert all(torch.equal(a[2:4], b) for a, b in zip(whole, part))


def test_the_loader_serves_each_step_and_micro_step_in_order(tmp_path):
    dataset = _dataset(tmp_path)
    cfg = TrainConfig(seq_len=16, batch_size=4, grad_accum=2, max_steps=5)
    par = Parallelism()
    loader = BatchLoader(dataset, cfg, par, start=2, micro_steps=2)
    for step in range(2, 5):
        for micro in range(2):
            expected = local_batch(dataset, "train", cfg, par, step, micro)
            assert all(torch.equal(a, b) for a, b in zip(loader.next(), expected))
    loader.close()
    half = dataclasses.replace(cfg, batch_size=8)
    two = Parallelism(dp=2)  # rank 0 of two: the first half of each global batch
    assert torch.equal(
        local_batch(dataset, "train", half, two, 4)[0], local_batch(dataset, "train", half, Parallelism(), 4)[0][:4]
    )


def test_each_row_is_a_window_of_its_sources_stream(tmp_path):
    """Read against the token streams themselves, not against the loader's own code: every row's inputs and targets
    are one window of seq_len + 1 consecutive tokens of one source's split, shifted by one; at document starts the
    window begins where a document does, or a whole number of windows (of seq_len tokens) after; the segment numbers
    change exactly where a document starts."""
    import numpy as np

    dataset = _dataset(tmp_path)
    streams = {
        (i, split): getattr(source, split) for i, source in enumerate(dataset.sources) for split in ("train", "val")
    }
    tokens = {key: shards.read(0, len(shards)) for key, shards in streams.items()}
    seen = set()
    for split, documents, step in [("train", False, 1), ("train", True, 2), ("val", True, 3), ("val", False, 4)]:
        inputs, targets, segments = dataset.batch(split, 8, 16, 7, step, at_document_starts=documents)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row, target, segment in zip(inputs.numpy(), targets.numpy(), segments.numpy()):
            window = np.append(row, target[-1])
            found = [
                (source, start)
                for (source, part), stream in tokens.items()
                if part == split
                for start in np.flatnonzero(stream[: len(stream) - 16] == window[0])
                if np.array_equal(stream[start : start + 17], window)
            ]
            assert found, (split, documents, step)

            # (a repeated passage may occur elsewhere too)
            def fits(
                source: int, start: int, split: str = split, documents: bool = documents, segment: np.ndarray = segment
            ) -> bool:
                starts = streams[source, split].starts
                document = starts[np.searchsorted(starts, start, side="right") - 1]
                boundaries = np.isin(np.arange(start + 1, start + 16), starts)
                return (not documents or (start - document) % 16 == 0) and np.array_equal(
                    np.diff(segment) > 0, boundaries
                )

            assert any(fits(*place) for place in found), (split, documents, step)
            seen.update(source for source, _ in found)
    assert seen == {0, 1}  # both sources drawn
