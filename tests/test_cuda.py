"""The CUDA paths, run by benchmarks/gpu_check.sh on a machine with a GPU (skipped elsewhere): a training step
without host syncs, bf16 training against fp32, FP8 GEMMs through torch._scaled_mm against their exact emulation,
the serving engine in bf16."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import tiny_config
from nanoseek.fp8.linear import Fp8Recipe, fp8_linear
from nanoseek.model.transformer import Transformer
from nanoseek.parallel.collectives import clip_grad_norm
from nanoseek.parallel.setup import Parallelism
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(num_nextn_predict_layers=1)).to(CUDA)


def test_training_step_never_syncs_with_the_host():
    """Forward (router, experts' grouped GEMM, MTP), backward, clipping and the fused AdamW step, with CUDA's sync
    debug mode turning any device-to-host wait into an error."""
    model = _model()
    optimizer = build_optimizer(model, TrainConfig(), CUDA)
    ids = torch.randint(0, 96, (4, 32), device=CUDA)
    for step in range(3):  # the first step allocates optimizer state: check the steady state too
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, ids)
            (out.lm_loss + 0.3 * out.mtp_loss).backward()
            norm = clip_grad_norm(list(model.parameters()), 1.0, Parallelism(device=CUDA))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(norm).item()


def test_bf16_training_step_matches_fp32_to_bf16_accuracy():
    model = _model()
    ids = torch.randint(0, 96, (4, 32), device=CUDA)
    full = model(ids, ids).lm_loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(ids, ids).lm_loss
    assert abs(full.item() - half.item()) < 1e-2 * full.item()
    half.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_fp8_scaled_mm_equals_its_emulation():
    """The scaled_mm backend warns and falls back to emulation where the device refuses it: here that is an error,
    since the point is to run the FP8 kernel."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 512, device=CUDA), torch.randn(256, 512, device=CUDA)
    emulated = fp8_linear(x, w, Fp8Recipe(backend="emulate"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = fp8_linear(x, w, Fp8Recipe(backend="scaled_mm"))
    assert torch.allclose(scaled, emulated, rtol=1e-5, atol=1e-4)


def test_engine_serves_on_cuda_in_bf16():
    """The serving engine on the GPU in bf16 (paged store, device sampling, MTP verification): speculation gives
    plain greedy's tokens, chunked or not."""
    from nanoseek.infer.engine import Engine, EngineConfig
    from nanoseek.infer.request import SamplingParams

    model = _model().to(torch.bfloat16)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17)]
    params = SamplingParams(max_new_tokens=24)
    plain = Engine(model, config=EngineConfig(speculation=False, block_size=16)).generate(prompts, params)
    speculative = Engine(model, config=EngineConfig(block_size=16, token_budget=16)).generate(prompts, params)
    assert [r.token_ids for r in speculative] == [r.token_ids for r in plain]
    assert all(len(r.token_ids) == 24 for r in plain)
