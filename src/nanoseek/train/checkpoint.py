"""Training checkpoints: weights, optimizer state, step (= data position) and RNG states, written atomically.

A checkpoint is a directory checkpoints/step_NNNNNNN/ that is assembled under a temporary name and renamed into
place only when complete, so a process killed mid-write leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoseek.errors import CheckpointError

PREFIX = "step_"


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:07d}"
    tmp = directory / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if "head.weight" in state and state["head.weight"].data_ptr() == state["embed.weight"].data_ptr():
        del state["head.weight"]  # tied: stored once
    save_file(state, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}, tmp / "optimizer.pt")
    (tmp / "trainer.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted writes are not listed)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restores model, optimizer and RNGs in place; returns trainer.json."""
    try:
        meta = json.loads((path / "trainer.json").read_text())
        state = load_file(str(path / "model.safetensors"))
        extra = torch.load(path / "optimizer.pt", weights_only=False)
    except (OSError, json.JSONDecodeError, SafetensorError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: {e}") from None
    if "head.weight" not in state and "embed.weight" in state:
        state["head.weight"] = state["embed.weight"]
    try:
        model.load_state_dict(state, strict=True)
        optimizer.load_state_dict(extra["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not match this model: {str(e).splitlines()[0]}") from None
    torch.set_rng_state(extra["torch_rng"])
    np.random.set_state(extra["numpy_rng"])
    random.setstate(extra["python_rng"])
    return meta
