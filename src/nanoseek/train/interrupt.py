"""Stopping a training run cleanly. Cluster schedulers preempt jobs with SIGTERM (then SIGKILL after a grace
period), and people press Ctrl-C: either one asks the run to finish its current step, write a checkpoint and exit
with EXIT_INTERRUPTED. A second Ctrl-C (or SIGTERM) aborts at once.

Under torchrun the signal may reach only some ranks (or reach them during different steps), so the ranks agree
after every step, with a CPU tensor (gloo, also on a CUDA run's "cpu:gloo,cuda:nccl" group) that never waits on the
accelerator: all of them stop after the same step and all of them take part in the checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """`with StopRequests() as stop:` … `if stop.agreed(): checkpoint, then raise RunInterrupted`."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step to write a checkpoint "
                "(Ctrl-C again to abort without one)",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective under torchrun: every rank calls it after every step)."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def resume_hint(step: int, checkpoint: str, command: str) -> str:
    return f"stopped after step {step}; checkpoint {checkpoint}. Resume with the same command plus --resume ({command})"
