"""DeepSeek's released checkpoints as tests/fixtures/releases lists them (config.json, and every tensor's name, dtype
and shape, written from DeepSeek's files rather than from nanoseek's name table): nanoseek's model of each released
config reads every released tensor, at its released shape, and nothing of the model is left unread."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import RELEASE_FIXTURES, released
from nanoseek import ModelConfig, build_model
from nanoseek.checkpoint.hf import to_hf_state_dict
from nanoseek.models.deepseek_v4.checkpoint import release_aliases

RELEASES = ["deepseek-v3", "deepseek-v32", "deepseek-v4-flash"]
SCALES = (".weight_scale_inv", ".scale")  # V3's fp32 inverse scales, V4's ue8m0 ones


@pytest.fixture(scope="module", params=RELEASES)
def release(request):
    config_json, tensors = released(request.param)
    config = ModelConfig.from_hf_dict(config_json)
    with torch.device("meta"):  # the full-size model, shapes only
        model = build_model(config)
    return request.param, config, tensors, {k: tuple(v.shape) for k, v in to_hf_state_dict(model).items()}


def test_the_fixtures_list_what_their_notes_count():
    counts = {name: len(released(name)[1]) for name in RELEASES}
    for name, count in counts.items():
        about = json.loads((RELEASE_FIXTURES / f"{name}.json").read_text())["about"]
        assert f"{count:,} names in all" in about, name
    assert counts["deepseek-v3"] == 91991


def test_every_released_tensor_is_read_at_its_shape_and_nothing_is_left_unread(release):
    name, config, tensors, ours = release
    weights = {k: v for k, v in tensors.items() if not k.endswith(SCALES)}
    aliases = release_aliases(weights) if config.architecture == "deepseek_v4" else {}
    read_as = {aliases.get(k, k): (k, *v) for k, v in weights.items()}
    assert not sorted(set(read_as) - set(ours))[:5], "released tensors the loader has no place for"
    assert not sorted(set(ours) - set(read_as))[:5], "model tensors no released tensor fills"
    for key, (theirs, dtype, shape) in read_as.items():
        unpacked = (*shape[:-1], shape[-1] * 2) if dtype == "I8" else shape  # two FP4 values a byte
        assert unpacked == ours[key], (theirs, shape, ours[key])
