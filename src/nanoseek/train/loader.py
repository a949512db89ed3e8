"""A training run's batches, on the device ahead of need. Each data-parallel rank reads only its rows of the global
batch (every row is still drawn, so each layout trains on the one-process batches). On CUDA the next micro-batch is
read on a background thread while the current one trains, and travels from pinned memory by a non-blocking copy on
a stream of its own, which the training stream waits for on the device, never the host. On a CPU the batch is read
when asked for: a reader thread there would take cycles from the step's own threads (measured: -11 % tokens/s)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from nanoseek.data.dataset import TokenDataset
from nanoseek.parallel.setup import Parallelism
from nanoseek.train.config import TrainConfig

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, segment numbers: [rows, seq_len] each


def local_batch(
    dataset: TokenDataset, split: str, cfg: TrainConfig, par: Parallelism, step: int, micro: int = 0
) -> Batch:
    """This data-parallel rank's rows of the global batch (step, micro) of `split`, on the host."""
    rows = cfg.batch_size // par.dp
    return dataset.batch(
        split,
        cfg.batch_size,
        cfg.seq_len,
        cfg.seed,
        step,
        micro,
        at_document_starts=cfg.window_starts == "documents",
        rows=range(par.dp_rank * rows, (par.dp_rank + 1) * rows),
    )


class BatchLoader:
    """`next()` → the training batch of each (step, micro-step) from `start` on, in order, on the device."""

    def __init__(self, dataset: TokenDataset, cfg: TrainConfig, par: Parallelism, start: int, micro_steps: int):
        self.dataset, self.cfg, self.par = dataset, cfg, par
        self.keys = iter([(step, micro) for step in range(start, cfg.max_steps) for micro in range(micro_steps)])
        self.cuda = par.device.type == "cuda"
        self.stream = torch.cuda.Stream(par.device) if self.cuda else None
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="batches") if self.cuda else None
        self.pending: Future[Batch] | None = None
        self._read_ahead()

    def _read_ahead(self) -> None:
        key = next(self.keys, None)
        if key is None:
            self.pending = None
        elif self.reader is None:  # read now, in this thread
            self.pending = Future()
            self.pending.set_result(self._load(*key))
        else:
            self.pending = self.reader.submit(self._load, *key)

    def _load(self, step: int, micro: int) -> Batch:
        batch = local_batch(self.dataset, "train", self.cfg, self.par, step, micro)
        if not self.cuda:
            return batch
        with torch.cuda.stream(self.stream):
            return tuple(t.pin_memory().to(self.par.device, non_blocking=True) for t in batch)

    def next(self) -> Batch:
        if self.pending is None:
            raise StopIteration("the loader has served every step of the run")
        batch = self.pending.result()
        if self.cuda:  # the copy must land before the step reads it, and its memory outlive the step's use
            current = torch.cuda.current_stream(self.par.device)
            current.wait_stream(self.stream)
            for tensor in batch:
                tensor.record_stream(current)
        self._read_ahead()
        return batch

    def close(self) -> None:
        if self.reader is not None:
            self.reader.shutdown(cancel_futures=True)
