"""Where a command runs its model: `--device` (auto: the GPU when there is one) and `--dtype` (auto: bf16 on a
GPU, fp32 on a CPU, whose bf16 matmuls are ~50x slower)."""

from __future__ import annotations

import argparse

import torch

from nanoseek.errors import NanoseekError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPES),
        help="weights and latent cache: auto = bf16 on a GPU, fp32 on a CPU",
    )


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The flags → (device, dtype), or one line saying why that device cannot be used."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise NanoseekError(f"--device {device!r} is not a device: give auto, cpu, cuda or cuda:N") from None
    if chosen.type not in ("cpu", "cuda"):
        raise NanoseekError(f"--device {device!r}: nanoseek runs on cpu or cuda")
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise NanoseekError(
            f"--device {device}: no such CUDA device on this machine ({torch.cuda.device_count()} visible)"
        )
    if dtype == "auto":
        return chosen, torch.bfloat16 if chosen.type == "cuda" else torch.float32
    return chosen, DTYPES[dtype]
