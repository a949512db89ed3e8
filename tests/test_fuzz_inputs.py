"""Property-based fuzzing (hypothesis, fixed seeds, bounded example counts) of the file-shaped inputs the CLI reads:
model configs (JSON), training configs (YAML, TOML), corpora, tokenizer files. Whatever the file holds, the command
either works or exits 2 with one `nanoseek: error:` line; any other exception propagates out of `main` and fails the
test with its traceback."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from helpers import cli_exit, fuzz
from nanoseek.cli import main
from nanoseek.presets import PRESETS

json_scalars = st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
CONFIG = PRESETS["tiny"].to_hf_dict()


@st.composite
def mutated_configs(draw) -> dict:
    """The tiny preset's config.json with fields dropped, retyped or given odd values."""
    config = dict(CONFIG)
    for name in draw(st.lists(st.sampled_from(sorted(CONFIG)), max_size=4, unique=True)):
        if draw(st.booleans()):
            config.pop(name)
        else:
            config[name] = draw(json_values | st.integers(-2, 4096) | st.floats(-1, 1e6))
    return config


@fuzz(30, 500, config=mutated_configs())
def test_model_config_json(tmp_path_factory, capsys, config):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(config))
    cli_exit(capsys, "info", str(path))


@fuzz(30, 250, raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_model_config_bytes(tmp_path_factory, capsys, raw):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_bytes(raw)
    cli_exit(capsys, "info", str(path))  # `{}` is valid: DeepSeek-V3's own shape


TRAIN_FIELDS = (
    "seq_len",
    "batch_size",
    "lr",
    "max_steps",
    "schedule",
    "balance",
    "precision",
    "seed",
    "use_mtp",
    "warmup_steps",
    "vocab_size",
    "tokenizer",
    "eval_every",
    "grad_accum",
    "min_lr_ratio",
    "betta1",
)
MODEL_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "n_routed_experts",
    "num_experts_per_tok",
    "rope_scaling",
    "kv_lora_rank",
    "attention_type",
    "hiden_size",
)


@st.composite
def training_configs(draw) -> dict:
    sections = {}
    for section, names in (("train", TRAIN_FIELDS), ("model", MODEL_FIELDS)):
        keys = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
        sections[section] = {k: draw(json_values | st.integers(-2, 600)) for k in keys}
    if draw(st.integers(0, 9)) == 0:
        sections[draw(st.text(max_size=6))] = draw(json_values)
    return sections


def _to_toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_to_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_to_toml(v) for v in value) + "]"
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


@fuzz(
    40, 300, config=training_configs(), kind=st.sampled_from(["yaml", "toml"]), raw=st.none() | st.binary(max_size=200)
)
def test_training_config_files(tmp_path_factory, capsys, config, kind, raw):
    """Every file either fails with one line or gets as far as the corpus, which here is missing (exit 2 as well:
    no training runs)."""
    import yaml

    directory = tmp_path_factory.mktemp("train-cfg")
    path = directory / f"run.{kind}"
    if raw is not None:
        path.write_bytes(raw)
    elif kind == "yaml":
        path.write_text(yaml.safe_dump(config))
    else:
        path.write_text(
            "".join(
                f"[{s}]\n" + "".join(f"{json.dumps(k)} = {_to_toml(v)}\n" for k, v in values.items())
                for s, values in config.items()
                if isinstance(values, dict)
            )
        )
    assert (
        cli_exit(
            capsys,
            "train",
            "--config",
            str(path),
            "--data",
            str(directory / "missing.txt"),
            "--out",
            str(directory / "run"),
        )
        == 2
    )


def test_misspelled_settings_get_did_you_mean(capsys, tmp_path):
    assert main(["train", "train.seq_lne=64", "--out", str(tmp_path)]) == 2
    assert "did you mean 'train.seq_len'" in capsys.readouterr().err
    assert main(["train", "model.hiden_size=64", "--out", str(tmp_path)]) == 2
    assert "did you mean 'model.hidden_size'" in capsys.readouterr().err
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  betta1: 0.9\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path)]) == 2
    assert "did you mean 'train.beta1'" in capsys.readouterr().err
    info = tmp_path / "config.json"
    info.write_bytes(bytes(range(256)))
    assert main(["info", str(info)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["train", "--train.seq_lne", "64", "--out", str(tmp_path)]) == 2  # the dashed form users type
    assert "did you mean 'train.seq_len'" in capsys.readouterr().err
