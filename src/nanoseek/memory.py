"""Memory the machine has free, and a check that a model's training state can fit in it before anything is
allocated (a typo in a config must fail in a line, not in the kernel's OOM killer)."""

from __future__ import annotations

import torch

from nanoseek.errors import NanoseekError


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def check_training_fits(params: int, bytes_per_param: int, processes: int, device: torch.device) -> None:
    """NanoseekError if one process's share of weights, gradients and optimizer states alone exceeds the free
    memory (activations come on top, so passing this is necessary, not sufficient)."""
    need, free = params * bytes_per_param / processes, available_memory(device)
    if need > free:
        raise NanoseekError(
            f"the model has {params:,} parameters: their weights, gradients and AdamW states need "
            f"~{need / 2**30:,.1f} GiB per process, but {free / 2**30:,.1f} GiB is free on {device}"
        )
