"""FP8 training numerics (V3 §3.3): quantizers, the FP8 GEMMs and their gradients, conversion, BF16 moments,
recomputation and the FP8 checkpoint format."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_logits_match, randomize_, tiny_config
from nanoseek.checkpoint.fp8 import is_fp8_weight
from nanoseek.checkpoint.hf import load_pretrained, save_pretrained
from nanoseek.fp8.convert import convert_to_fp8
from nanoseek.fp8.gemm import fp8_mm, row_scales
from nanoseek.fp8.linear import Fp8Linear, Fp8Recipe, fp8_grouped_mm, fp8_linear
from nanoseek.fp8.quant import (
    E4M3_MAX,
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_grouped_tiles,
    quantize_tiles,
)
from nanoseek.models.common.moe import grouped_mm
from nanoseek.models.registry import build_model
from nanoseek.presets import preset
from nanoseek.train.config import TrainConfig
from nanoseek.train.metrics import saved_tensor_bytes
from nanoseek.train.optim import AdamWLowPrecisionMoments, optimizer_state_bytes

BACKENDS = ["emulate", "scaled_mm"]


def _within_e4m3(x: torch.Tensor, back: torch.Tensor, scale: torch.Tensor) -> bool:
    """E4M3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself, a subnormal (below 2^-6 in
    quantized units) by at most half its 2^-9 step."""
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    return bool(((x - back).abs() <= bound).all())


@pytest.mark.parametrize("pow2", [False, True])
def test_tile_and_block_roundtrips(pow2):
    torch.manual_seed(0)
    x = torch.randn(5, 300) * torch.logspace(-3, 2, 300)  # tiles of very different magnitudes
    q, scale = quantize_tiles(x, pow2)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 3)
    assert _within_e4m3(x, dequantize_tiles(q, scale), scale.repeat_interleave(128, 1)[:, :300])
    amax = x[:, 256:].abs().amax(dim=1)
    if pow2:  # powers of two, and the tile's largest value still fits
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round())) and (amax / scale[:, 2] <= E4M3_MAX).all()
    else:  # the largest value of each tile lands exactly on E4M3's maximum
        assert torch.equal(q[:, 256:].float().abs().amax(dim=1), torch.full((5,), E4M3_MAX))
    w = torch.randn(3, 200, 300)  # stacked experts: blocks per expert
    qw, sw = quantize_blocks(w, pow2)
    assert sw.shape == (3, 2, 3)
    per_element = sw.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :200, :300]
    assert _within_e4m3(w, dequantize_blocks(qw, sw), per_element)
    assert torch.equal(quantize_blocks(w[1], pow2)[1], sw[1])


def test_grouped_tiles_restart_at_each_group():
    torch.manual_seed(0)
    x = torch.randn(4, 300)
    x[:, 100:130] *= 1000  # a loud expert must not coarsen its neighbours' scales
    ends = torch.tensor([100, 100, 130, 300], dtype=torch.int32)  # one expert gets no tokens
    q, scale = quantize_grouped_tiles(x, ends)
    bounds = [0, 100, 130, 300]
    for start, end in zip(bounds[:-1], bounds[1:]):
        q_ref, s_ref = quantize_tiles(x[:, start:end])
        assert torch.equal(q[:, start:end].float(), q_ref.float())
        assert torch.equal(scale[:, start:end], s_ref.repeat_interleave(128, 1)[:, : end - start])


def _reference_linear(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The FP8 recipe written out with float64 accumulation: forward, Dgrad and Wgrad from quantized operands."""

    def deq_tiles(t):
        return dequantize_tiles(*quantize_tiles(t)).double()

    w_deq = dequantize_blocks(*quantize_blocks(w)).double()
    x_kept = dequantize_tiles(*quantize_tiles(x))  # what forward keeps of x, re-tiled along tokens for Wgrad
    return (deq_tiles(x) @ w_deq.t(), deq_tiles(dy) @ w_deq, deq_tiles(dy.t()) @ deq_tiles(x_kept.t()).t())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_linear_matches_its_recipe_and_fp32(backend):
    torch.manual_seed(0)
    x = torch.randn(200, 300, requires_grad=True)
    w = (0.05 * torch.randn(150, 300)).requires_grad_()
    y = fp8_linear(x, w, Fp8Recipe(backend=backend))
    dy = torch.randn_like(y)
    y.backward(dy)
    fp8 = (y, x.grad, w.grad)
    ref_y, ref_dx, ref_dw = _reference_linear(x.detach(), w.detach(), dy)
    x.grad = w.grad = None
    (x @ w.t()).backward(dy)
    fp32 = (x.detach() @ w.detach().t(), x.grad, w.grad)
    for got, exact, full in zip(fp8, (ref_y, ref_dx, ref_dw), fp32):
        assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-6  # only fp32 rounding apart
        assert 0.005 < ((got - full).norm() / full.norm()).item() < 0.06  # E4M3's error, and really quantized


def test_gemm_error_does_not_grow_with_k():
    """With fp32 accumulation (promoted every 128 on the scaled_mm path) the error is the operands' rounding
    alone: the same at K = 8192 as at K = 128 (without promotion, DeepSeek measured ~2 % at K = 4096 and growing)."""
    errors = {backend: {} for backend in BACKENDS}
    for k in (128, 1024, 8192):
        torch.manual_seed(k)
        a, b = torch.randn(32, k), torch.randn(48, k)
        qa, sa = quantize_tiles(a)
        qb, sb = quantize_blocks(b)
        exact = a.double() @ b.double().t()
        for backend in BACKENDS:
            out = fp8_mm(qa, sa, qb, row_scales(sb, 48), backend)
            errors[backend][k] = ((out.double() - exact).norm() / exact.norm()).item()
    for backend, by_k in errors.items():
        assert all(0 < e < 0.05 for e in by_k.values()), (backend, by_k)
        assert by_k[8192] <= 1.25 * by_k[128], (backend, by_k)


def test_fp8_grouped_gemm_matches_per_expert_fp8_linears():
    torch.manual_seed(0)
    x = torch.randn(300, 192, requires_grad=True)
    w = (0.05 * torch.randn(4, 256, 192)).requires_grad_()
    ends = torch.tensor([90, 90, 170, 300], dtype=torch.int32)  # expert 1 gets no tokens
    y = fp8_grouped_mm(x, w, ends, Fp8Recipe())
    dy = torch.randn_like(y)
    y.backward(dy)
    starts = [0, 90, 90, 170]
    for e, (start, end) in enumerate(zip(starts, ends.tolist())):
        xe = x.detach()[start:end].clone().requires_grad_()
        we = w.detach()[e].clone().requires_grad_()
        if end == start:
            assert w.grad[e].abs().max() == 0
            continue
        ye = fp8_linear(xe, we, Fp8Recipe())
        ye.backward(dy[start:end])
        torch.testing.assert_close(y[start:end], ye, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad[start:end], xe.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad[e], we.grad, rtol=1e-5, atol=1e-5)
    ref = grouped_mm(x.detach(), w.detach(), ends)
    assert ((y - ref).norm() / ref.norm()).item() < 0.06


def _v4_config():
    from test_parity_v4 import v4_config

    return v4_config(initializer_range=0.02, num_nextn_predict_layers=1)


CONVERTED = {
    "v3": (
        lambda: tiny_config(num_nextn_predict_layers=1),
        {
            "layers.0.attn.q_down",
            "layers.0.attn.kv_up",
            "layers.0.attn.out_proj",
            "layers.0.mlp.gate_up",
            "layers.1.mlp.experts",
            "layers.1.mlp.shared.down",
            "mtp.0.eh_proj",
        },
    ),
    # V4: its attention projections (DeepSeek ships the compressors and indexers in BF16), experts, shared experts,
    # the MTP projections
    "v4": (
        _v4_config,
        {
            "layers.1.attn.q_down",
            "layers.1.attn.q_up",
            "layers.1.attn.kv_proj",
            "layers.1.attn.out_proj",
            "layers.1.mlp.experts",
            "layers.1.mlp.shared.down",
            "mtp.0.e_proj",
            "mtp.0.h_proj",
        },
    ),
}


def test_a_refused_grouped_kernel_is_said_once_and_emulated(monkeypatch):
    """torch._scaled_grouped_mm where it cannot run (here: a CPU tensor, which it has no kernel for) → one warning,
    then None every time, which sends the experts' GEMM to the emulation; on a CPU the layer never asks it."""
    from nanoseek.fp8 import grouped

    monkeypatch.setattr(grouped, "_refused", [])
    x, w, ends = torch.randn(8, 32), torch.randn(2, 16, 32), torch.tensor([3, 8], dtype=torch.int32)
    with pytest.warns(UserWarning, match="refused the experts' FP8 GEMM"):
        assert grouped.scaled_grouped_mm(x, w, ends, False) is None
    assert grouped.scaled_grouped_mm(x, w, ends, False) is None and len(grouped._refused) == 1
    monkeypatch.setattr(grouped, "_refused", [])
    y = fp8_grouped_mm(x, w, ends, Fp8Recipe(backend="scaled_mm"))  # CPU: the emulation, never the kernel
    assert not grouped._refused and torch.allclose(y, fp8_grouped_mm(x, w, ends, Fp8Recipe(backend="emulate")))


@pytest.mark.parametrize("kind", CONVERTED)
def test_convert_covers_v3s_fp8_gemms_and_keeps_the_rest(kind):
    """The projections DeepSeek runs in FP8 (and only those) become FP8 GEMMs: the converted model's logits are,
    within 1e-5, those of the same weights with each converted GEMM written out as the recipe (E4M3 1×128 tiles of
    the input, 128×128 blocks of the weight; the experts one at a time), and far from the unquantized model's."""
    make_config, expected = CONVERTED[kind]
    config = make_config()
    torch.manual_seed(0)
    model = build_model(config)
    reference = build_model(config)
    keys = list(model.state_dict())
    converted = convert_to_fp8(model, Fp8Recipe())
    assert list(model.state_dict()) == keys  # checkpoints do not change
    assert expected <= set(converted) and not any(".compressor." in n or ".indexer." in n for n in converted)
    assert type(model.head) is torch.nn.Linear and not isinstance(model.layers[1].mlp.router, Fp8Linear)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        randomize_(model)  # weights at std 0.2: logits of several units
        for name in converted:  # the reference: V3's recipe written out, E4M3 tiles of x times E4M3 blocks of W
            module = reference.get_submodule(name)
            if hasattr(module, "gemm"):
                module.gemm = _recipe_grouped_gemm
            else:
                module.forward = lambda x, w=module.weight: _recipe_matmul(x.reshape(-1, x.shape[-1]), w).view(
                    *x.shape[:-1], w.shape[0]
                )
        reference.load_state_dict(model.state_dict())
        full = build_model(config)
        full.load_state_dict(model.state_dict())
        got, want, unquantized = model(ids), reference(ids), full(ids)
    assert_logits_match(got, want, relative=1e-5)
    assert (got - unquantized).abs().max() > 1e-2 * unquantized.abs().max()  # really quantized
    model(ids, ids).lm_loss.backward()
    assert all(p.grad is not None for p in model.layers[1].mlp.experts.parameters())


def _recipe_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weightᵀ, each operand rounded as V3's FP8 GEMMs round it (1×128 tiles, 128×128 blocks)."""
    return dequantize_tiles(*quantize_tiles(x)) @ dequantize_blocks(*quantize_blocks(weight)).t()


def _recipe_grouped_gemm(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """The routed experts' GEMM one expert at a time: its rows by its [out, in] weight, through the recipe."""
    starts = torch.cat([group_ends.new_zeros(1), group_ends[:-1]]).tolist()
    return torch.cat([_recipe_matmul(x[a:b], w) for a, b, w in zip(starts, group_ends.tolist(), weight)])


def test_bf16_moments_follow_adamw():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, requires_grad=True) for _ in range(3)]
    runs = {}
    for name in ("torch", "fp32", "bf16"):
        ps = [p.detach().clone().requires_grad_() for p in params]
        opt = (
            torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
            if name == "torch"
            else AdamWLowPrecisionMoments(
                ps,
                lr=1e-2,
                betas=(0.9, 0.999),
                weight_decay=0.1,
                moment_dtype=torch.float32 if name == "fp32" else torch.bfloat16,
            )
        )
        for step in range(5):
            torch.manual_seed(step)
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        runs[name] = (torch.cat([p.flatten() for p in ps]), optimizer_state_bytes(opt))
    torch.testing.assert_close(runs["fp32"][0], runs["torch"][0], rtol=1e-6, atol=1e-6)
    assert 0 < (runs["bf16"][0] - runs["torch"][0]).abs().max() < 1e-3
    moments = 2 * sum(p.numel() for p in params)
    assert runs["torch"][1] - runs["bf16"][1] == 2 * moments  # 4 → 2 bytes per moment element


def test_recompute_gives_the_same_gradients_and_keeps_less():
    config = tiny_config(num_hidden_layers=2, num_nextn_predict_layers=0, q_lora_rank=16, hidden_size=64)
    torch.manual_seed(0)
    model = build_model(config)
    ids = torch.randint(0, config.vocab_size, (4, 64))
    x = torch.randn(4, 64, config.hidden_size, requires_grad=True)
    cos, sin = model.rope(torch.arange(64))
    grads, kept = [], []
    for recompute in (False, True):
        for layer in model.layers:
            layer.attn.recompute = recompute
        model.zero_grad()
        model(ids, ids).lm_loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        kept.append(saved_tensor_bytes(lambda: model.layers[0].attn(x, cos, sin))[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert kept[1] < 0.5 * kept[0]  # only the compressed inputs (and the output projection's input) stay


def test_fp8_export_reads_back_in_nanoseek_and_transformers(tmp_path):
    import transformers

    config = tiny_config(
        hidden_size=256,
        intermediate_size=256,
        moe_intermediate_size=128,
        q_lora_rank=128,
        kv_lora_rank=128,
        num_attention_heads=2,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        num_nextn_predict_layers=1,
    )
    torch.manual_seed(0)
    model = build_model(config).eval()
    written = save_pretrained(model, tmp_path, fp8=True)
    quantized = {k.removesuffix("_scale_inv") for k in written if k.endswith("weight_scale_inv")}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in quantized
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" not in quantized  # 192 rows: not whole blocks
    assert not any("eh_proj" in k or "embed" in k or "head" in k or "norm" in k for k in quantized)
    assert all(k in written for k in quantized)
    loaded = load_pretrained(tmp_path, device="cpu").eval()
    with torch.no_grad():  # what the reader gets back is the block-quantized weight exactly
        expected = model.layers[1].mlp.experts.down[3]
        assert torch.equal(loaded.layers[1].mlp.experts.down[3], dequantize_blocks(*quantize_blocks(expected)))
        assert torch.equal(loaded.layers[0].attn.kv_down.weight, model.layers[0].attn.kv_down.weight)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        assert (loaded(ids) - reference(ids).logits).abs().max().item() <= 1e-5


def test_is_fp8_weight_rules():
    square = torch.zeros(256, 128)
    assert is_fp8_weight("model.layers.3.self_attn.o_proj.weight", square)
    assert not is_fp8_weight("model.layers.61.eh_proj.weight", square)
    assert not is_fp8_weight("model.layers.3.mlp.gate.weight", square)
    assert not is_fp8_weight("model.layers.3.self_attn.o_proj.weight", torch.zeros(576, 128))
    # V3.2: the indexer's query and key projections are FP8 in DeepSeek's release, its head weights are not
    assert is_fp8_weight("model.layers.3.self_attn.indexer.wq_b.weight", square)
    assert is_fp8_weight("model.layers.3.self_attn.indexer.wk.weight", square)
    assert not is_fp8_weight("model.layers.3.self_attn.indexer.weights_proj.weight", square)


def test_precision_and_compute_dtype():
    assert TrainConfig(precision="fp8").compute_dtype(torch.device("cpu")) == torch.float32
    assert TrainConfig(precision="fp8").compute_dtype(torch.device("cuda")) == torch.bfloat16
    assert TrainConfig(precision="fp32").compute_dtype(torch.device("cuda")) == torch.float32


def test_fp8_training_tracks_fp32(tmp_path, monkeypatch):
    """The V3 claim in small: an FP8 run (here with BF16 moments and recomputation too) ends near the fp32 run.
    benchmarks/fp8_training.py checks the report's 0.25 % on the tiny preset's full run."""
    from test_train import MICRO_YAML, _corpus_lines

    from nanoseek.train.config import apply_overrides, read_config_file
    from nanoseek.train.trainer import RunSpec, train

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("\n".join(_corpus_lines()))
    (tmp_path / "micro.yaml").write_text(MICRO_YAML)
    overrides = {
        **read_config_file(tmp_path / "micro.yaml"),
        "train.max_steps": 40,
        "train.eval_every": 40,
        "train.save_every": 40,
        "train.eval_batches": 4,
    }
    losses = {}
    for name, extra in (
        ("fp32", {}),
        ("fp8", {"train.precision": "fp8", "train.optimizer_moments": "bf16", "train.recompute": True}),
    ):
        model, cfg = apply_overrides(preset("tiny"), TrainConfig(), {**overrides, **extra})
        summary = train(RunSpec(tmp_path / name, model, cfg, str(tmp_path / "corpus.txt")), show_progress=False)
        losses[name] = summary["val_loss"]
    assert losses["fp32"] < 5.0  # it learned something (uniform over 300 tokens is 5.7)
    assert abs(losses["fp8"] - losses["fp32"]) / losses["fp32"] < 0.01
