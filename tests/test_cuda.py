"""The CUDA paths, run by benchmarks/gpu_check.sh on a machine with a GPU (skipped elsewhere): the trainer's step
without host syncs, bf16 training against fp32, FP8 GEMMs (per-tile and blockwise torch._scaled_mm, the experts'
torch._scaled_grouped_mm) against their emulation at PyTorch's own tolerances, TF32 only when asked, the serving
engine in bf16."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import randomize_, tiny_config
from nanoseek.fp8.linear import Fp8Recipe, fp8_linear
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import build_model
from nanoseek.parallel.setup import Parallelism
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _model() -> DeepseekV3Model:
    torch.manual_seed(0)
    return build_model(tiny_config(num_nextn_predict_layers=1)).to(CUDA)


def test_training_step_never_syncs_with_the_host(tmp_path):
    """The trainer's own step (train/step.py): the loader's pinned, read-ahead batches, two micro-batches, router,
    experts' grouped GEMM, MTP, the balance loss, the expert loads, clipping, the fused AdamW step and the
    aux-loss-free bias update, with CUDA's sync debug mode turning any device-to-host wait into an error. (The
    training loop reads the step's values once per logged step, by design.)"""
    from nanoseek.data.dataset import TokenDataset
    from nanoseek.data.sources import Source, default_corpus_files
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.train.loader import BatchLoader
    from nanoseek.train.step import TrainStep

    play = default_corpus_files()[0]
    dataset = TokenDataset.build([Source(str(play))], train_tokenizer([play.read_text()], 300), progress=False)
    cfg = TrainConfig(seq_len=32, batch_size=4, grad_accum=2, max_steps=4, precision="bf16", seq_aux_alpha=1e-3)
    torch.manual_seed(0)
    model = build_model(tiny_config(num_nextn_predict_layers=1, vocab_size=300)).to(CUDA)
    par = Parallelism(device=CUDA, compute_dtype=torch.bfloat16)
    step = TrainStep(model, build_optimizer(model, cfg, CUDA), cfg, par, BatchLoader(dataset, cfg, par, 0, 2))
    step(0)  # the first step allocates optimizer state: the steady state is what must not sync
    for number in range(1, 4):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = step(number)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(result.grad_norm).item() and result.sums[2].item() > 0


def test_bf16_training_step_matches_fp32_to_bf16_accuracy():
    """As tests/test_precision.py's CPU check, on CUDA's kernels: weights at std 0.2 (logits of several units), each
    position's bf16 logits within 10·2⁻⁸ of the largest fp32 logit and the same top-1, but where bf16 rounding flips
    an expert choice (at most a quarter of the positions); then the bf16 backward is finite."""
    model = randomize_(_model())
    ids = torch.randint(0, 96, (4, 32), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids).float()
    close = (logits - full).abs().amax(-1) <= 10 * 2**-8 * full.abs().max()
    assert close.float().mean() >= 0.75 and (logits.argmax(-1) == full.argmax(-1)).float().mean() >= 0.75
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(ids, ids).lm_loss
    half.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# PyTorch's own tolerances for its FP8 GEMMs against their emulation (test_scaled_matmul_cuda.py): fp32 out 2e-3,
# bf16 out 7e-2 (atol and rtol alike)
FP32_OUT, BF16_OUT = {"atol": 2e-3, "rtol": 2e-3}, {"atol": 7e-2, "rtol": 7e-2}


def _cublas_has_fp32_rowwise() -> bool:
    """cuBLAS writes fp32 from row-wise scaled FP8 from CUDA 12.9 on, on sm90 and later (as PyTorch's tests say)."""
    version = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    return version >= (12, 9) and torch.cuda.get_device_capability() >= (9, 0)


def test_fp8_per_tile_scaled_mm_equals_its_emulation():
    """One torch._scaled_mm per 128 of K, fp32 out, summed in fp32: equal to the exact emulation."""
    from nanoseek.fp8.gemm import _tiled_scaled_mm, row_scales
    from nanoseek.fp8.quant import dequantize_tiles, quantize_blocks, quantize_tiles

    if not _cublas_has_fp32_rowwise():
        pytest.skip("row-wise FP8 with fp32 output needs CUDA 12.9+ and sm90+")
    torch.manual_seed(0)
    qx, sx = quantize_tiles(torch.randn(64, 512, device=CUDA))
    qw, sw = quantize_blocks(torch.randn(256, 512, device=CUDA))
    rows = row_scales(sw, 256)
    torch.testing.assert_close(
        _tiled_scaled_mm(qx, sx, qw, rows), dequantize_tiles(qx, sx) @ dequantize_tiles(qw, rows).t(), **FP32_OUT
    )


def test_fp8_linear_on_the_gpu_equals_its_emulation():
    """fp8_linear's forward and both gradients on the scaled_mm backend (one blockwise GEMM where this cuBLAS takes
    1×128 / 128×128 scales) against the exact emulation, at bf16-output tolerance."""
    torch.manual_seed(0)
    x = torch.randn(256, 512, device=CUDA, requires_grad=True)
    w = torch.randn(256, 512, device=CUDA, requires_grad=True)
    results = []
    for backend in ("scaled_mm", "emulate"):
        y = fp8_linear(x, w, Fp8Recipe(backend=backend))
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    for ours, exact in zip(*results):
        torch.testing.assert_close(ours, exact, **BF16_OUT)


def test_fp8_experts_run_the_scaled_grouped_kernel():
    """The experts' FP8 grouped GEMM takes torch._scaled_grouped_mm (row-wise scales, fp8/grouped.py) and equals
    its emulation from the same E4M3 values and scales; the weight gradient equals the tiled emulation's."""
    from nanoseek.fp8.grouped import quantize_rows
    from nanoseek.fp8.linear import fp8_grouped_mm

    torch.manual_seed(0)
    x = torch.randn(96, 256, device=CUDA, requires_grad=True)
    w = torch.randn(4, 128, 256, device=CUDA, requires_grad=True)
    group_ends = torch.tensor([16, 48, 48, 96], device=CUDA, dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused kernel would warn and emulate: here that is a failure
        y = fp8_grouped_mm(x, w, group_ends, Fp8Recipe(backend="scaled_mm"))
    (qx, sx), (qw, sw) = quantize_rows(x.detach(), False), quantize_rows(w.detach(), False)
    a, b = qx.float() * sx[:, None], qw.float() * sw[..., None]
    starts = [0, 16, 48, 48]
    expected = torch.cat([a[s:e] @ b[g].t() for g, (s, e) in enumerate(zip(starts, [16, 48, 48, 96]))])
    torch.testing.assert_close(y.float(), expected, **BF16_OUT)
    y.backward(torch.ones_like(y))
    dw = w.grad.clone()
    w.grad = None
    fp8_grouped_mm(x, w, group_ends, Fp8Recipe(backend="emulate")).backward(torch.ones_like(y))
    torch.testing.assert_close(dw, w.grad, **BF16_OUT)


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


def test_server_loads_onto_the_gpu_and_scores_prompts(tmp_path):
    """`nanoseek serve --device auto`: weights load straight onto the GPU in bf16, the latent store lives there, and
    echoed prompt scores (lm-evaluation-harness's request) match the CPU fp32 model to bf16 accuracy."""
    from fastapi.testclient import TestClient

    import nanoseek
    from helpers import micro_model_dir
    from nanoseek.device import resolve_device
    from nanoseek.infer.server import create_app

    model_dir = micro_model_dir(tmp_path, "User: hello there\nAssistant: good morrow\n" * 50, 300, 320, std=0.2)
    device, dtype = resolve_device("auto", "auto")
    app = create_app(model_dir, device=device, dtype=dtype)
    prompt = [5, 17, 42, 8, 99, 3]
    with TestClient(app) as client:
        card = client.get("/v1/models").json()["data"][0]
        out = client.post(
            "/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 4}
        ).json()
    assert card["device"].startswith("cuda") and card["dtype"] == "bfloat16"
    assert app.state.engine.runner.store.device.type == "cuda"
    # the same bf16 weights computed in fp32 on the CPU; bf16 accuracy is a few 2⁻⁸ of the largest logit (weights
    # at std 0.2: another model's scores would be units away)
    with torch.no_grad():
        logits = nanoseek.load_pretrained(model_dir, dtype=torch.bfloat16).float()(torch.tensor([prompt]))[0]
    reference = logits.log_softmax(-1)
    want = torch.tensor([reference[i, t].item() for i, t in enumerate(prompt[1:])])
    got = torch.tensor(out["choices"][0]["logprobs"]["token_logprobs"][1 : len(prompt)])
    assert logits.abs().max() > 3 and (got - want).abs().max() <= 4 * 2**-8 * logits.abs().max()


def test_tf32_is_used_only_when_asked():
    """train.tf32: fp32 matmuls round their inputs to TensorFloat-32 only when the option is on."""
    from nanoseek.train.precision import use_tf32

    torch.manual_seed(0)
    a, b = torch.randn(512, 512, device=CUDA), torch.randn(512, 512, device=CUDA)
    reference = a.double() @ b.double()
    try:
        use_tf32(False)
        exact = (a @ b - reference).abs().max().item()
        use_tf32(True)
        rounded = (a @ b - reference).abs().max().item()
    finally:
        use_tf32(False)
    assert exact < 1e-3 < rounded
