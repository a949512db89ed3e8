"""What a run records: metrics.jsonl (one JSON object per logged step), loss.png, and MFU against a matmul peak
measured on this machine at start."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul in the training dtype: the practical peak MFU is measured against. The fastest
    of many timed products counts, so a moment of contention on a shared machine does not lower the peak."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    fastest, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        tic = time.perf_counter()
        a @ b
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - tic)
    return 2 * n**3 / fastest


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Runs fn and returns the bytes autograd keeps for backward meanwhile (each storage counted once), and fn's
    result: the activation memory that recomputation and FP8 copies reduce."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Adds up the time spent inside `with stopwatch:` (evaluation, checkpoints), which tokens/s leaves out; the
    device is synchronized first, so that queued training work is not counted as paused."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self.start


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():  # drop rows a killed run logged after its last checkpoint
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self._write_all([r for r in rows if r["step"] <= resume_step])
        elif resume_step is None:
            self._write_all([])

    def _write_all(self, rows: list[dict[str, Any]]) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train LM loss"), ("mtp_loss", "train MTP loss"), ("val_loss", "validation loss")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
