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
from nanoseek.parallel.setup import Parallelism
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(num_nextn_predict_layers=1)).to(CUDA)


def test_training_step_never_syncs_with_the_host(tmp_path):
    """The trainer's own step (train/step.py): the loader's pinned, read-ahead batches, two micro-batches, router,
    experts' grouped GEMM, MTP, the balance loss, the expert loads, clipping, the fused AdamW step and the
    aux-loss-free bias update, with CUDA's sync debug mode turning any device-to-host wait into an error. (The
    training loop reads the step's values once per logged step, by design.)"""
    from nanoseek.data.dataset import TokenDataset
    from nanoseek.data.sources import Source, default_corpus_files
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.train.balance import configure_balance
    from nanoseek.train.loader import BatchLoader
    from nanoseek.train.step import TrainStep

    play = default_corpus_files()[0]
    dataset = TokenDataset.build([Source(str(play))], train_tokenizer([play.read_text()], 300), progress=False)
    cfg = TrainConfig(seq_len=32, batch_size=4, grad_accum=2, max_steps=4, precision="bf16", seq_aux_alpha=1e-3)
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_nextn_predict_layers=1, vocab_size=300)).to(CUDA)
    configure_balance(model.moe_layers(), cfg)
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


def test_server_loads_onto_the_gpu_and_scores_prompts(tmp_path):
    """`nanoseek serve --device auto`: weights load straight onto the GPU in bf16, the latent store lives there, and
    echoed prompt scores (lm-evaluation-harness's request) match the CPU fp32 model to bf16 accuracy."""
    from fastapi.testclient import TestClient

    import nanoseek
    from helpers import micro_model_dir
    from nanoseek.device import resolve_device
    from nanoseek.infer.server import create_app

    model_dir = micro_model_dir(tmp_path, "User: hello there\nAssistant: good morrow\n" * 50, 300, 320)
    device, dtype = resolve_device("auto", "auto")
    app = create_app(model_dir, device=device, dtype=dtype)
    prompt = [5, 17, 42, 8, 99, 3]
    with TestClient(app) as client:
        card = client.get("/v1/models").json()["data"][0]
        out = client.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 1,
                                                   "max_tokens": 4}).json()
    assert card["device"].startswith("cuda") and card["dtype"] == "bfloat16"
    assert app.state.engine.runner.store.device.type == "cuda"
    with torch.no_grad():
        reference = nanoseek.load_pretrained(model_dir)(torch.tensor([prompt]))[0].log_softmax(-1)
    want = [reference[i, t].item() for i, t in enumerate(prompt[1:])]
    assert out["choices"][0]["logprobs"]["token_logprobs"][1:len(prompt)] == pytest.approx(want, abs=0.1)


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
