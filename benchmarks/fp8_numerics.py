"""FP8 numerics and memory, measured: GEMM error against K, gradient error, optimizer and activation memory.

    .venv/bin/python benchmarks/fp8_numerics.py [--preset small] [--batch 4] [--seq 512]

1. Relative error per token (mean over output rows) of a [256, K] x [K, 256] product against float64, K = 128 ... 8192,
   on Gaussian activations with an LLM-like spread (token scales over five orders of magnitude, outlier channels):
   bf16 operands; FP8 with one scale per tensor; V3's fine-grained FP8 with fp32 accumulation (nanoseek); and the same
   FP8 operands summed in a ~14-bit accumulator without promotion, the Hopper behaviour V3 §3.3.2 works around.
2. The FP8 linear's input and weight gradients against fp32.
3. Memory of one training step of the preset: optimizer state with fp32 vs BF16 moments, and the activations autograd
   keeps for backward (each storage counted once) in fp32, with recomputation, with FP8, and with both.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from nanoseek.fp8.gemm import fp8_mm, row_scales
from nanoseek.fp8.linear import Fp8Recipe, fp8_linear
from nanoseek.fp8.quant import E4M3, E4M3_MAX, dequantize_tiles, quantize_blocks, quantize_tiles
from nanoseek.models.registry import build_model
from nanoseek.presets import preset
from nanoseek.train.config import TrainConfig
from nanoseek.train.metrics import saved_tensor_bytes
from nanoseek.train.optim import build_optimizer, optimizer_state_bytes
from nanoseek.train.precision import apply_precision


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


def token_relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over output rows (tokens) of each row's relative error: every token counts, not just the loud ones."""
    return ((got.double() - exact).norm(dim=1) / exact.norm(dim=1)).mean().item()


def truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keeps `bits` bits of mantissa, rounding toward zero: a narrow accumulator register."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.trunc(mantissa * 2**bits) / 2**bits, exponent)


def unpromoted_fp8_mm(a: torch.Tensor, b: torch.Tensor, bits: int = 14) -> torch.Tensor:
    """Fine-grained FP8 operands, but every partial sum kept in a `bits`-bit accumulator along all of K."""
    qa, sa = quantize_tiles(a)
    qb, sb = quantize_blocks(b)
    a_deq, b_deq = dequantize_tiles(qa, sa), dequantize_tiles(qb, row_scales(sb, b.shape[0]))
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for k in range(0, a.shape[1], 4):  # the tensor core adds products in groups before rounding the sum
        acc = truncate_mantissa(acc + a_deq[:, k : k + 4].double() @ b_deq[:, k : k + 4].double().t(), bits)
    return acc


def per_tensor_fp8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sa, sb = a.abs().max() / E4M3_MAX, b.abs().max() / E4M3_MAX
    return ((a / sa).to(E4M3).double() * sa) @ ((b / sb).to(E4M3).double() * sb).t()


def gemm_table() -> None:
    print("| K | bf16 | FP8 per-tensor | FP8 fine-grained, fp32 accumulate | FP8 fine-grained, 14-bit accumulate |")
    print("|---|---|---|---|---|")
    for k in (128, 512, 1024, 2048, 4096, 8192):
        torch.manual_seed(k)
        # activations as LLMs have them: token norms spread over orders of magnitude, a few outlier channels
        a = torch.randn(256, k) * torch.logspace(-3, 2, 256).unsqueeze(1)
        a[:, ::97] *= 100
        b = torch.randn(256, k) * 0.02
        exact = a.double() @ b.double().t()
        qa, sa = quantize_tiles(a)
        qb, sb = quantize_blocks(b)
        fine = fp8_mm(qa, sa, qb, row_scales(sb, 256), "emulate")
        bf16 = a.bfloat16().double() @ b.bfloat16().double().t()
        sub = slice(0, 64)  # the 14-bit accumulator is emulated step by step: a 64 x 64 corner
        unpromoted = unpromoted_fp8_mm(a[sub], b[sub])
        print(
            f"| {k} | {100 * token_relative_error(bf16, exact):.2f} % | "
            f"{100 * token_relative_error(per_tensor_fp8_mm(a, b), exact):.2f} % | "
            f"{100 * token_relative_error(fine, exact):.2f} % | "
            f"{100 * token_relative_error(unpromoted, exact[sub, sub]):.2f} % |"
        )


def gradient_errors() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 1024, requires_grad=True)
    w = (0.02 * torch.randn(768, 1024)).requires_grad_()
    dy = torch.randn(512, 768)
    fp8_linear(x, w, Fp8Recipe()).backward(dy)
    fp8 = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (x @ w.t()).backward(dy)
    print(
        f"\nFP8 linear 512x1024 -> 768, gradients against fp32: input {100 * relative_error(fp8[0], x.grad):.2f} %,"
        f" weight {100 * relative_error(fp8[1], w.grad):.2f} %"
    )


def memory_report(shape: str, batch: int, seq: int) -> None:
    config = preset(shape)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mib = 2**20
    print(f"\nMemory, {shape} preset, batch {batch} x seq {seq}:")
    print("| setting | optimizer state | activations kept for backward |")
    print("|---|---|---|")
    for name, changes in (
        ("fp32", {}),
        ("bf16 moments", {"optimizer_moments": "bf16"}),
        ("recompute", {"recompute": True}),
        ("fp8", {"precision": "fp8"}),
        ("fp8 + recompute + bf16 moments", {"precision": "fp8", "recompute": True, "optimizer_moments": "bf16"}),
    ):
        cfg = dataclasses.replace(TrainConfig(), **changes)
        torch.manual_seed(0)
        model = build_model(config)
        apply_precision(model, cfg)
        optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        activations, out = saved_tensor_bytes(lambda: model(ids, ids))  # noqa: B023 (called here, in this iteration)
        (out.lm_loss + 0.3 * out.mtp_loss).backward()
        optimizer.step()
        print(f"| {name} | {optimizer_state_bytes(optimizer) / mib:.1f} MiB | {activations / mib:.1f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    gemm_table()
    gradient_errors()
    memory_report(args.preset, args.batch, args.seq)


if __name__ == "__main__":
    main()
