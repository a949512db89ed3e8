"""What a run records: metrics.jsonl (one JSON object per logged step), loss.png, tokens/s over a stated window of
steps, and MFU against a peak that the run cannot exceed: the datasheet's for GPUs it knows, else a matmul peak
measured on this machine (raised whenever the run beats it, e.g. when the machine was busy at start)."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.25) -> float:
    """FLOP/s of a large square matmul in the training dtype: the practical peak MFU is measured against. The fastest
    of many timed products counts (a dozen on a 2-core CPU, hundreds on a GPU), so a moment of contention on a shared
    machine does not lower the peak; a run that beats it measures again (PeakFlops), so a short look suffices."""
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


# Dense bf16 tensor-core peaks of the SXM parts (NVIDIA datasheets; the "with sparsity" figures are twice these)
DATASHEET_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "B200": 2250e12}


class PeakFlops:
    """The FLOP/s that MFU divides by: `source` says whether it came from a datasheet or was measured here."""

    def __init__(self, device: torch.device, dtype: torch.dtype, processes: int):
        self.device, self.dtype, self.processes = device, dtype, processes
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        known = [flops for part, flops in DATASHEET_BF16_FLOPS.items() if part in name]
        if known and dtype == torch.bfloat16:
            self.per_process, self.source = known[0], "datasheet"
        else:
            self.per_process, self.source = measure_peak_flops(device, dtype), "measured"

    def mfu(self, achieved_flops: float) -> float:
        """Model FLOP/s over the peak. A measured peak the run exceeds was measured under contention: it is measured
        again (between steps, so it is not counted as training time) and never lowered."""
        if achieved_flops > self.per_process * self.processes and self.source == "measured":
            self.per_process = max(self.per_process, measure_peak_flops(self.device, self.dtype))
        return min(1.0, achieved_flops / (self.per_process * self.processes))


class Throughput:
    """Tokens/s over the last `window` steps, training time only (evaluation and checkpoints are left out)."""

    def __init__(self, window: int = 50):
        self.window = window
        self.intervals: deque[tuple[int, float]] = deque()  # (steps, seconds) per logged interval

    def add(self, steps: int, seconds: float) -> None:
        self.intervals.append((steps, seconds))
        while len(self.intervals) > 1 and self.steps - self.intervals[0][0] >= self.window:
            self.intervals.popleft()

    @property
    def steps(self) -> int:
        return sum(steps for steps, _ in self.intervals)

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * self.steps / max(1e-9, sum(seconds for _, seconds in self.intervals))


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


def progress_text(row: dict[str, Any], val_loss: float | None, peak_source: str) -> str:
    """The progress bar's figures: tok/s over the window it covers; MFU marked ≈ against a measured peak (and
    shown as ≥100% if it reaches the cap)."""
    mfu = "≥100%" if row["mfu"] >= 1 else f"{100 * row['mfu']:.1f}%"
    text = (
        f"loss {row['loss']:.3f}"
        + (f" val {val_loss:.3f}" if val_loss is not None else "")
        + f" tok/s {row['tokens_per_s']:.0f} (last {row['tokens_per_s_steps']} steps) "
        f"mfu{'≈' if peak_source == 'measured' else ' '}{mfu}"
    )
    return text + (f" imb {row['imbalance_window']:.2f}" if "imbalance_window" in row else "")


def log_row(
    done: int,
    mean_sums: torch.Tensor,
    grad_norm: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_accum: int,
    with_mtp: bool,
    with_indexer: bool = False,
) -> dict[str, Any]:
    """The metrics of a logged step: the one host read of its (LM, MTP, balance, indexer KL) loss sums and gradient
    norm."""
    lm, mtp, aux, kl = (mean_sums / grad_accum).tolist()
    row: dict[str, Any] = {
        "step": done,
        "loss": lm,
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm.item(),
    }
    if with_mtp:
        row["mtp_loss"] = mtp
    if aux:
        row["aux_loss"] = aux
    if with_indexer:
        row["indexer_kl"] = kl
    return row
