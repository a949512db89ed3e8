"""TrainConfig: everything about a run except the model shape, validated on construction."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from nanoseek.config import ModelConfig
from nanoseek.errors import ConfigError
from nanoseek.validate import check_field_types


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the final share of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    balance: Literal["aux-free", "aux-loss", "none"] = "aux-free"
    bias_update_speed: float = 0.01  # γ of aux-loss-free balancing (V3: 0.001 over ~100x more steps)
    seq_aux_alpha: float = 0.0001  # α of the sequence-wise balance loss (aux-free keeps it small, as V3)
    aux_loss_alpha: float = 0.01  # α when balancing by the loss alone (--balance aux-loss)
    mtp_weight: float = 0.3  # λ
    use_mtp: bool = True
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 200
    keep_checkpoints: int = 3
    seed: int = 1337
    vocab_size: int = 4096  # of a tokenizer trained on the corpus
    tokenizer: str | None = None  # a tokenizer.json to use instead
    text_field: str = "text"  # of .jsonl and .parquet corpora
    tokenizer_sample_mb: int = 64  # of text spread over the corpus files that a new tokenizer is trained on
    strict_data: bool = False  # a malformed line or row stops the run (else it is skipped and counted)
    window_starts: Literal["any", "documents"] = "any"  # windows anywhere, or aligned to documents (data/dataset.py)
    document_mask: bool = False  # documents packed into a window do not attend to each other
    log_every: int = 10
    # precision and memory (V3 §3.3): auto = bf16 autocast on accelerators, fp32 on CPUs; fp8 = FP8 GEMMs in the
    # attention projections, MLPs and experts, everything else as auto
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    fp8_pow2_scales: bool = False  # round FP8 scales up to powers of two
    fp8_backend: Literal["auto", "emulate", "scaled_mm"] = "auto"
    optimizer_moments: Literal["fp32", "bf16"] = "fp32"  # AdamW's m and v; master weights stay fp32
    recompute: bool = False  # keep only MLA's compressed inputs; replay norms, up-projections and core in backward
    tf32: bool = False  # fp32 matmuls on CUDA in TensorFloat-32 (train/precision.py)
    compile: bool = False  # torch.compile each block (what cannot compile, e.g. the experts' grouped GEMM, stays eager)
    # V3.2 models (model.index_n_heads > 0): "warmup" trains only the indexers, by KL to dense attention; "sparse"
    # trains everything with top-k attention, the indexers by KL over their selection (train/dsa.py)
    dsa: Literal["warmup", "sparse"] = "sparse"
    # under torchrun: how long a collective may wait for the other processes (gloo and NCCL alike) before the run
    # stops with an error naming the cause; and a checkpoint's save or load (DCP over a gloo group of its own)
    collective_timeout_s: float = 120.0
    checkpoint_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        check_field_types(self, "train")
        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "eval_batches",
            "save_every",
            "keep_checkpoints",
            "vocab_size",
            "log_every",
            "tokenizer_sample_mb",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"train field {name!r}: must be a positive integer, got {getattr(self, name)!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train field 'warmup_steps': must be >= 0, got {self.warmup_steps}")
        for name in ("lr", "beta1", "beta2", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train field {name!r}: must be positive, got {getattr(self, name)}")
        for name in ("collective_timeout_s", "checkpoint_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(
                    f"train field {name!r}: must be a positive number of seconds, got {getattr(self, name)}"
                )
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ConfigError("train fields 'min_lr_ratio' and 'decay_fraction' must lie in [0, 1]")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """What autocast computes in: bf16 where asked for, or by default on accelerators (a CPU's bf16 matmuls are
        far slower than its fp32 ones)."""
        if self.precision == "bf16" or (self.precision in ("auto", "fp8") and device.type != "cpu"):
            return torch.bfloat16
        return torch.float32


# What may change when a run resumes: its length, learning-rate schedule and cadences, and how it computes without
# changing what (compilation, recomputation, TF32, timeouts). Everything else shapes the model, the data position or
# the optimizer state that the checkpoint holds.
RESUMABLE = frozenset(
    {
        "max_steps",
        "lr",
        "warmup_steps",
        "schedule",
        "decay_fraction",
        "min_lr_ratio",
        "eval_every",
        "eval_batches",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "compile",
        "recompute",
        "tf32",
        "collective_timeout_s",
        "checkpoint_timeout_s",
    }
)

# Model fields a run sets itself (from its tokenizer and train.use_mtp), whatever the command line said: the same
# command with --resume must not be refused over them.
DERIVED_MODEL_FIELDS = frozenset({"vocab_size", "bos_token_id", "eos_token_id", "num_nextn_predict_layers"})


def resume_train_config(
    saved_model: ModelConfig, saved_train: TrainConfig, model: ModelConfig, train: TrainConfig, explicit: frozenset[str]
) -> TrainConfig:
    """The train config a resumed run continues with: the checkpoint's, plus the explicitly given settings
    (`explicit`: keys as `model.X` / `train.X`) that RESUMABLE allows to change. Any other explicit setting that
    differs from the checkpoint is refused, naming the field."""
    changes = {}
    for key in sorted(explicit - {f"model.{name}" for name in DERIVED_MODEL_FIELDS}):
        section, _, name = key.rpartition(".")
        asked, saved = (  # a field one of the two generations lacks reads as None
            (getattr(train, name), getattr(saved_train, name))
            if section == "train"
            else (getattr(model, name, None), getattr(saved_model, name, None))
        )
        if asked == saved:
            continue
        if section != "train" or name not in RESUMABLE:
            raise ConfigError(
                f"--resume: {key} is {saved!r} in the checkpoint and cannot change to {asked!r} (it "
                f"shapes the model, the data or the optimizer state); only these may change: "
                f"{', '.join(sorted(RESUMABLE))}"
            )
        changes[name] = asked
    return dataclasses.replace(saved_train, **changes)


def _coerce(value: str, current: Any) -> Any:
    """A command-line string as the type of the field it overrides."""
    if isinstance(current, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if isinstance(current, str):  # e.g. balance=none is the string "none"
        return value
    if isinstance(current, tuple):  # a list: [a,b,c] or a,b,c
        return tuple(item.strip().strip("'\"") for item in value.strip().strip("[]").split(",") if item.strip())
    if value.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        if isinstance(current, kind):
            return kind(value)
    if current is None:
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def qualified_keys(model: ModelConfig, train: TrainConfig, overrides: dict[str, Any]) -> frozenset[str]:
    """The overrides' keys as `model.FIELD` / `train.FIELD` (a bare name means the train field if one exists)."""
    train_fields = {f.name for f in dataclasses.fields(train)}
    return frozenset(key if "." in key else f"{'train' if key in train_fields else 'model'}.{key}" for key in overrides)


def apply_overrides(
    model: ModelConfig, train: TrainConfig, overrides: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """Overrides keyed `model.FIELD` / `train.FIELD` (or a bare field name found in either config)."""
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    # the model's fields, and those of the generations that extend it (V3 + model.index_n_heads is V3.2)
    current = {
        "model": model.known_fields(),
        "train": {f.name: getattr(train, f.name) for f in dataclasses.fields(train)},
    }
    fields = {section: set(values) for section, values in current.items()}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if not section:
            section = "train" if name in fields["train"] else "model"
        if section not in fields or name not in fields[section]:
            known = [f"{sec}.{field}" for sec, names in fields.items() for field in sorted(names)]
            close = difflib.get_close_matches(
                key if section else f"{section or 'train'}.{name}", known, n=1
            ) or difflib.get_close_matches(f"model.{name}", known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (use model.FIELD or train.FIELD)"
            raise ConfigError(f"unknown setting {key!r}{hint}")
        if isinstance(value, str):
            try:
                value = _coerce(value, current[section][name])
            except ValueError as e:
                raise ConfigError(f"setting {key!r}: {e}") from None
        changes[section][name] = value
    try:
        return model.replace(**changes["model"]), dataclasses.replace(train, **changes["train"])
    except TypeError as e:
        raise ConfigError(str(e)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or TOML file with optional `model:` and `train:` sections → flat dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            import tomllib  # Python >= 3.11

            raw = tomllib.loads(path.read_text())
        else:
            import yaml

            raw = yaml.safe_load(path.read_text()) or {}
    except Exception as e:  # both parsers raise their own error types; the message says what is wrong
        raise ConfigError(f"cannot parse {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping with 'model' and/or 'train' sections")
    flat: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in ("model", "train") or not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level keys must be 'model' or 'train' sections, got {section!r}")
        flat.update({f"{section}.{k}": v for k, v in values.items()})
    return flat
