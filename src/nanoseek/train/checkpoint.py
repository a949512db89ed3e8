"""Training checkpoints: weights + optimizer state as a torch.distributed.checkpoint (DCP) directory, plus the step
(= data position) and RNG states. DCP stores every tensor under its global shape, so a checkpoint written by N
processes (FSDP shards, expert-parallel shards) resumes on M processes, or on one.

A checkpoint is checkpoints/step_NNNNNNN/, assembled under a temporary name and renamed into place only when every
process has written its part, so a process killed mid-write, or a full disk, leaves the previous checkpoints as they
were and never lists a partial one. The RNG states are plain tensors and numbers, loaded with weights_only=True;
DCP's own .metadata file is a pickle (see docs/threat-model.md).
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

from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import copy_tokenizer_files
from nanoseek.errors import CheckpointError, ConfigError, describe_write_failure, first_line
from nanoseek.train.config import TrainConfig

PREFIX = "step_"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier(group: dist.ProcessGroup | None) -> None:
    if dist.is_initialized():
        dist.barrier(group)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"{PREFIX}{step:07d}"


def _agree(ok: bool, group: dist.ProcessGroup | None) -> bool:
    """Whether every process succeeded (collective; a CPU tensor, which the default group sends over gloo)."""
    if not dist.is_initialized():
        return ok
    failed = torch.tensor([0 if ok else 1])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    return not failed.item()


def _rng_states() -> dict[str, Any]:
    """This process's RNG states as tensors and numbers only, so that loading them needs no pickle."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_position": int(position),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached_gaussian),
        "python_version": version,
        "python_state": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss_next": gauss_next,
    }


def _restore_rng_states(path: Path) -> None:
    try:
        states = torch.load(path, weights_only=True)
        torch.set_rng_state(states["torch"])
        np.random.set_state(
            (
                "MT19937",
                states["numpy_keys"].numpy().astype(np.uint32),
                states["numpy_position"],
                states["numpy_has_gauss"],
                states["numpy_cached_gaussian"],
            )
        )
        random.setstate((states["python_version"], tuple(states["python_state"].tolist()), states["python_gauss_next"]))
    except Exception as e:  # torch.load's unpickler refuses anything but tensors and plain values
        raise CheckpointError(f"checkpoint RNG file {path} is damaged: {first_line(e)}") from None


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Collective: every process calls it (`group`: the one its waits run over, whose timeout allows a slow
    filesystem; default: the default group). A write that fails on any process (a full disk, a file-size limit)
    removes the partial checkpoint and raises CheckpointError on every process; earlier checkpoints are untouched."""
    final = checkpoint_path(directory, step)
    tmp = directory / f".tmp-{final.name}"
    error: BaseException | None = None
    try:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as e:
        error = e
    if _agree(error is None, group):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dcp.save(_state(model, optimizer), checkpoint_id=str(tmp), process_group=group)
            with open(tmp / f"rng-{_rank()}.pt", "wb") as f:  # synced like DCP's files, before the rename
                torch.save(_rng_states(), f)
                f.flush()
                os.fsync(f.fileno())
        except (Exception, CheckpointException) as e:  # DCP's own error type derives from BaseException
            error = e
    if _agree(error is None, group) and _rank() == 0:
        try:
            _write_synced(tmp / "trainer.json", json.dumps({"step": step, **meta}, indent=2))
            _fsync_directory(tmp)
            _move_into_place(tmp, final)
        except OSError as e:
            error = e
    if not _agree(error is None, group):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write checkpoint {final}: {describe_write_failure(directory, error)}; the "
            "previous checkpoints are intact"
        )
    if _rank() == 0:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(group)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Renames the finished checkpoint into place, durably. A checkpoint of the same step (a resumed run saving it
    again) is moved aside first and removed only once the new one is in place, or put back if the rename fails: it
    is never deleted before its replacement exists."""
    aside = final.with_name(f".old-{final.name}")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside.exists():
            os.replace(aside, final)
        raise
    _fsync_directory(final.parent)  # the rename itself survives a power loss
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_synced(path: Path, text: str) -> None:
    """Written and flushed to the disk before the checkpoint is renamed into place (DCP syncs its own files)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first by step (temporary directories of interrupted writes are not listed). A
    replacement cut off between its two renames left only the old checkpoint, moved aside: it is put back first."""
    if not directory.is_dir():
        return []
    for aside in directory.glob(f".old-{PREFIX}*"):
        final = aside.with_name(aside.name.removeprefix(".old-"))
        if not final.exists():
            try:
                os.replace(aside, final)
            except FileNotFoundError:  # another process of the run put it back first
                pass
    steps = [(_step_of(p.name), p) for p in directory.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in steps if s is not None)]


def _step_of(name: str) -> int | None:
    """step_0001234 → 1234; names past seven digits still sort by number, not as strings."""
    digits = name.removeprefix(PREFIX)
    return int(digits) if name.startswith(PREFIX) and digits.isascii() and digits.isdigit() else None


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "trainer.json").read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool):
        raise CheckpointError(f"checkpoint {path} is damaged: trainer.json has no integer 'step'")
    return meta


def saved_configs(meta: dict[str, Any], path: Path) -> tuple[ModelConfig, TrainConfig]:
    """The model and train configs a checkpoint's trainer.json records, or CheckpointError naming what is wrong."""
    data = meta.get("data")
    if (
        not isinstance(meta.get("model"), dict)
        or not isinstance(meta.get("train"), dict)
        or not (
            data is None or isinstance(data, str) or isinstance(data, list) and all(isinstance(d, str) for d in data)
        )
    ):
        raise CheckpointError(
            f"checkpoint {path} is damaged: trainer.json needs 'model' and 'train' objects and "
            "'data' sources (a list of paths) or null"
        )
    try:
        return ModelConfig.from_hf_dict(meta["model"]), TrainConfig(**meta["train"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: trainer.json: {e}") from None


def check_shapes(path: Path, config: ModelConfig) -> None:
    """The tensors a checkpoint holds must be the ones its config describes: checked against DCP's metadata on the
    meta device, before anything is allocated (a damaged config must not allocate a giant model first)."""
    from nanoseek.models.registry import build_model

    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # a missing, truncated or foreign .metadata file
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: {first_line(e)}") from None
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    for name, tensor in expected.items():
        found = getattr(stored.get(f"model.{name}"), "size", None)
        if found is None or tuple(found) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path} does not match its trainer.json: model.{name} is "
                f"{tuple(found) if found is not None else 'missing'}, the config makes it "
                f"{tuple(tensor.shape)}"
            )


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None = None
) -> dict[str, Any]:
    """Restores model, optimizer and (this rank's, if saved) RNGs in place; returns trainer.json."""
    meta = read_meta(path)
    state = _state(model, optimizer)
    try:
        with warnings.catch_warnings():  # DCP warns that a lone process is loading alone: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path), process_group=group)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    except (Exception, CheckpointException) as e:  # DCP's own error type derives from BaseException
        raise CheckpointError(
            f"checkpoint {path} is damaged or truncated, or does not match this model: {first_line(e)}"
        ) from None
    rng = path / f"rng-{_rank()}.pt"
    if rng.exists():
        _restore_rng_states(rng)
    return meta


def export_checkpoint(path: Path, out: Path, fp8: bool = False) -> list[str]:
    """A training checkpoint (DCP, from any number of processes) → an HF-layout model directory (`fp8`: in
    DeepSeek-V3's FP8 format)."""
    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.models.registry import build_model

    config = saved_configs(read_meta(path), path)[0]
    check_shapes(path, config)
    model = build_model(config)
    state = {"model": get_model_state_dict(model)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: {first_line(e)}") from None
    set_model_state_dict(model, state["model"])
    written = save_pretrained(model, out, fp8=fp8)
    copy_tokenizer_files(path.parent.parent, out)
    return written
