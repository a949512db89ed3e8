"""Training checkpoints: weights + optimizer state as a torch.distributed.checkpoint (DCP) directory, plus the step
(= data position) and RNG states. DCP stores every tensor under its global shape, so a checkpoint written by N
processes (FSDP shards, expert-parallel shards) resumes on M processes, or on one.

A checkpoint is checkpoints/step_NNNNNNN/, assembled under a temporary name and renamed into place only when
complete, so a process killed mid-write leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from nanoseek.errors import CheckpointError

PREFIX = "step_"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep: int) -> Path:
    """Collective: every process calls it."""
    final = directory / f"{PREFIX}{step:07d}"
    tmp = directory / f".tmp-{PREFIX}{step:07d}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    torch.save({"torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                "python_rng": random.getstate()}, tmp / f"rng-{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted writes are not listed)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: {e}") from None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restores model, optimizer and (this rank's, if saved) RNGs in place; returns trainer.json."""
    meta = read_meta(path)
    state = _state(model, optimizer)
    try:
        with warnings.catch_warnings():  # DCP warns that a lone process is loading alone: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    except (Exception, CheckpointException) as e:  # DCP's own error type derives from BaseException
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or truncated, or does not match this model: "
                              f"{first}") from None
    rng = path / f"rng-{_rank()}.pt"
    if rng.exists():
        states = torch.load(rng, weights_only=False)
        torch.set_rng_state(states["torch_rng"])
        np.random.set_state(states["numpy_rng"])
        random.setstate(states["python_rng"])
    return meta


def export_checkpoint(path: Path, out: Path, fp8: bool = False) -> list[str]:
    """A training checkpoint (DCP, from any number of processes) → an HF-layout model directory (`fp8`: in
    DeepSeek-V3's FP8 format)."""
    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.config import ModelConfig
    from nanoseek.model.transformer import Transformer

    meta = read_meta(path)
    model = Transformer(ModelConfig.from_hf_dict(meta["model"]))
    state = {"model": get_model_state_dict(model)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: {str(e).strip()[:200]}") from None
    set_model_state_dict(model, state["model"])
    written = save_pretrained(model, out, fp8=fp8)
    tokenizer = path.parent.parent / "tokenizer.json"
    if tokenizer.exists():
        shutil.copy(tokenizer, out / "tokenizer.json")
    return written
