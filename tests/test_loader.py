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
    return TokenDataset.build([Source(str(play)), Source(str(default_corpus_files()[1]), 0.5)], tokenizer,
                              progress=False)


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
    assert torch.equal(local_batch(dataset, "train", half, two, 4)[0],
                       local_batch(dataset, "train", half, Parallelism(), 4)[0][:4])
