"""Mixed precision without surprises: fp32-only buffers survive every cast, the router is fp32 and the experts'
grouped GEMM follows autocast, seeded initialization does not depend on where or how a model was built, and the
chunked head + cross-entropy equals logits then cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import nanoseek
from helpers import randomize_, tiny_config
from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.models.common.moe import Router, grouped_mm
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import build_model


def _model_with_distinct_biases() -> DeepseekV3Model:
    torch.manual_seed(0)
    model = build_model(tiny_config())
    with torch.no_grad():
        for moe in model.moe_layers():  # values that bf16 cannot tell apart (it rounds 1 + 2^-9 to 1)
            moe.router.expert_bias.copy_(1 + torch.arange(8) * 2.0**-12)
    return model


def test_bf16_load_keeps_the_correction_bias_bit_identical_to_the_file(tmp_path):
    save_pretrained(_model_with_distinct_biases(), tmp_path)
    stored = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if "e_score_correction_bias" in k}
    assert stored and all(v.dtype == torch.float32 and v.unique().numel() == 8 for v in stored.values())
    model = nanoseek.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    in_layer_order = [stored[k] for k in sorted(stored, key=lambda k: int(k.split(".")[2]))]
    assert len(in_layer_order) == len(model.moe_layers())
    for moe, bias in zip(model.moe_layers(), in_layer_order):
        assert moe.router.expert_bias.dtype == torch.float32 and torch.equal(moe.router.expert_bias, bias)


def test_kept_dtype_survive_every_cast():
    model = _model_with_distinct_biases()
    inv_freq = model.rope.inv_freq.clone()
    for cast in (
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.to("cpu", torch.bfloat16),
        lambda m: m.float(),
    ):
        cast(model)
        for moe in model.moe_layers():
            assert moe.router.expert_bias.dtype == moe.expert_load.dtype == torch.float32
            assert moe.router.expert_bias.unique().numel() == 8
        assert torch.equal(model.rope.inv_freq, inv_freq)


def test_router_is_fp32_under_autocast():
    torch.manual_seed(0)
    router = Router(tiny_config())
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, 32)
    weights, ids, scores = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights_ac, ids_ac, scores_ac = router(x)
    assert scores_ac.dtype == weights_ac.dtype == torch.float32
    assert torch.equal(ids, ids_ac) and torch.equal(scores, scores_ac) and torch.equal(weights, weights_ac)


def test_grouped_mm_follows_autocast_and_the_weight_dtype():
    torch.manual_seed(0)
    weight = torch.randn(3, 24, 32)
    x = torch.randn(10, 32)
    ends = torch.tensor([4, 4, 10], dtype=torch.int32)

    def per_expert(x, w):
        return torch.cat([x[:4] @ w[0].T, x[4:] @ w[2].T])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_mm(x, weight, ends)  # bf16 activations and fp32 weights used to fail here
        assert out.dtype == torch.bfloat16
        mixed = grouped_mm(x.bfloat16(), weight, ends)
    reference = per_expert(x.bfloat16(), weight.bfloat16())
    assert torch.allclose(out.float(), reference.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(mixed, out)
    plain = grouped_mm(x, weight.bfloat16(), ends)  # outside autocast: the (FSDP-cast) weight's dtype
    assert plain.dtype == torch.bfloat16
    assert torch.allclose(grouped_mm(x, weight, ends), per_expert(x, weight), atol=1e-5)


def test_seeded_init_depends_on_seed_and_names_only():
    config = tiny_config()
    torch.manual_seed(1)
    a = build_model(config)
    a.reset_parameters(seed=7)
    with torch.device("meta"):
        b = build_model(config)
    b.to_empty(device="cpu")
    torch.manual_seed(2)  # the global generator plays no part
    b.reset_parameters(seed=7)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    c = build_model(config)
    c.reset_parameters(seed=8)
    assert not torch.equal(a.embed.weight, c.embed.weight)
    # every matrix N(0, initializer_range), independently per parameter: two same-shaped ones differ
    assert abs(a.embed.weight.std().item() - config.initializer_range) < 0.1 * config.initializer_range
    assert not torch.equal(a.layers[1].mlp.experts.gate_up[0], a.layers[2].mlp.experts.gate_up[0])
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in (a.norm, a.layers[0].attn_norm))


@pytest.mark.parametrize("kind", ["v3", "v4"])
def test_bf16_autocast_forward_runs_and_agrees_with_fp32(kind):
    """Every weight random (std 0.2: logits of several units, not the ~0.1 of initialization, where any two models
    agree): under bf16 autocast each position's logits are the fp32 ones within 10·2⁻⁸ of the largest (measured:
    2-3 % through peaked attention), and the top-1 token is the same, except where bf16 rounding flips a discrete
    choice (an expert, an indexer's pick), which changes that position and those after it: at most a quarter here
    (measured 5 of 32 for V3, 3 of 32 for V4)."""
    from test_parity_v4 import _randomized, v4_config

    torch.manual_seed(0)
    model = randomize_(build_model(tiny_config())) if kind == "v3" else _randomized(v4_config())
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ids)
    assert half.dtype == torch.bfloat16
    delta = (half.float() - full).abs().amax(-1)
    close = delta <= 10 * 2**-8 * full.abs().max()
    assert delta.max() > 0 and close.float().mean() >= 0.75, delta
    assert (half.argmax(-1) == full.argmax(-1)).float().mean() >= 0.75


def test_grouped_gemms_take_zero_rows():
    """An expert-parallel rank can receive no tokens in a step: empty output, zero weight gradient."""
    from nanoseek.fp8.linear import Fp8Recipe, fp8_grouped_mm

    for gemm in (grouped_mm, lambda x, w, e: fp8_grouped_mm(x, w, e, Fp8Recipe())):
        weight = torch.randn(4, 64, 32, requires_grad=True)
        x = torch.zeros(0, 32, requires_grad=True)
        out = gemm(x, weight, torch.zeros(4, dtype=torch.int32))
        out.sum().backward()
        assert out.shape == (0, 64) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("rows, vocab", [(700, 4096), (300, 16384)])  # several chunks; one chunk
def test_chunked_head_cross_entropy_equals_logits_then_cross_entropy(rows, vocab):
    from nanoseek.models.common.loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(rows, 48, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, 48)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    targets[::7] = -100
    grads = {}
    for name, loss_fn in (
        ("reference", lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets)),
        ("chunked", lambda: linear_cross_entropy(hidden, weight, targets)),
    ):
        loss = loss_fn()
        (3 * loss).backward()  # a non-unit upstream gradient
        grads[name] = (loss.detach(), hidden.grad, weight.grad)
        hidden.grad = weight.grad = None
    for ours, reference in zip(grads["chunked"], grads["reference"]):
        assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, targets), grads["reference"][0], rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 GEMMs, softmax in fp32, as nn.Linear + cross_entropy
        reference = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        chunked = linear_cross_entropy(hidden, weight, targets)
    assert chunked.dtype == torch.float32 and torch.allclose(chunked, reference, rtol=1e-5)
