"""The study's GPU cost model: what a training token of each arm would cost on an H800, from how its FLOPs split
into GEMM kinds and what each kind runs at. A FLOP is not a FLOP: experts run as grouped GEMMs whose speed falls
with the tokens each expert receives, and FP8 doubles the tensor-core peak for the GEMMs it covers.

Time per token = Σ_kind FLOPs_kind / rate_kind, with (TFLOPS, H800 SXM):

- dense GEMMs (attention projections, dense and shared MLPs, MTP projection): FP8 1025, the DeepGEMM README's
  (Feb 2025) normal GEMM at M=4096, N=7168, K=2048; bf16 512, the same 51.8 % of its peak;
- routed experts (grouped GEMMs, M tokens per expert): FP8 295 (M=64), 510 (M=128), 1093 (M >= 4096),
  log-interpolated, from the same README's normal GEMM rows at N=7168, K=2048 and its contiguous grouped row
  (8 groups x 4096); bf16 the FP8 rate x 512/1025;
- router, output head, attention core: 512 (bf16 in both formats, as V3 keeps them).

Peaks: 989 TFLOPS bf16, 1979 FP8, dense (NVIDIA H100 SXM datasheet; the H800 has the same tensor cores). The bf16
rates are an assumption (the FP8 kernels' fraction of peak, applied to bf16), not a measurement: a lent GPU should
replace them with torch.mm / F.grouped_mm timings. Tokens per expert: TOKENS_PER_GPU (4 sequences of 4,096, a V3-like
micro-batch per GPU) · top-k / experts, balanced routing assumed. Elementwise work, communication and pipeline
bubbles are left out: they would add to both arms.
"""

from __future__ import annotations

import math

from nanoseek.config import ModelConfig
from nanoseek.flops import model_stats

PEAK_BF16, PEAK_FP8 = 989.0, 1979.0
FP8_DENSE = 1025.0
FP8_GROUPED_BY_TOKENS = ((64, 295.0), (128, 510.0), (4096, 1093.0))  # (tokens per expert, TFLOPS)
BF16_FRACTION = FP8_DENSE / PEAK_FP8  # the bf16 kernels are assumed to reach the FP8 kernels' fraction of peak
BF16_DENSE = PEAK_BF16 * BF16_FRACTION
TOKENS_PER_GPU = 4 * 4096
SOURCES = {
    "peaks": "NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOPS bf16, 1,979 FP8 (dense); H800 has the same compute",
    "fp8_gemms": "github.com/deepseek-ai/DeepGEMM README (Feb 2025), H800: normal GEMM M=4096 N=7168 K=2048 1025 "
    "TFLOPS, M=128 510, M=64 295; grouped contiguous 8 groups x 4096, N=7168 K=2048: 1093",
    "bf16_gemms": "assumed: the FP8 kernels' 51.8 % of peak, applied to the bf16 peak (not measured)",
}


def fp8_grouped_rate(tokens_per_expert: float) -> float:
    """TFLOPS of an FP8 grouped expert GEMM, log-interpolated in tokens per expert between DeepGEMM's rows."""
    points = FP8_GROUPED_BY_TOKENS
    if tokens_per_expert <= points[0][0]:
        return points[0][1]
    for (m0, r0), (m1, r1) in zip(points, points[1:]):
        if tokens_per_expert <= m1:
            t = math.log(tokens_per_expert / m0) / math.log(m1 / m0)
            return r0 + t * (r1 - r0)
    return points[-1][1]


def flops_by_kind(model: ModelConfig, seq_len: int, with_mtp: bool) -> dict[str, float]:
    """Training FLOPs per token split into dense GEMMs, routed-expert GEMMs and bf16-only work (router, head,
    attention core). MTP's FLOPs, when it trains, are split in the main model's proportions."""
    stats = model_stats(model, seq_len=seq_len)
    active = stats.active_components
    routed = 6 * active["routed_experts"]
    bf16_gemms = 6 * (active["router"] + active["head"])
    matmuls = 6 * (stats.active_params - active["norms"])
    core = stats.flops_per_token - matmuls
    kinds = {"dense_gemm": matmuls - routed - bf16_gemms, "routed_gemm": routed, "bf16_only": bf16_gemms + core}
    scale = 1 + (stats.mtp_flops_per_token / stats.flops_per_token if with_mtp else 0.0)
    return {k: v * scale for k, v in kinds.items()}


def seconds_per_token(kinds: dict[str, float], model: ModelConfig, fp8: bool) -> float:
    """H800 seconds for a token whose FLOPs split as `kinds` (flops_by_kind), in bf16 or with FP8 GEMMs."""
    seconds = kinds["dense_gemm"] / ((FP8_DENSE if fp8 else BF16_DENSE) * 1e12)
    seconds += kinds["bf16_only"] / (BF16_DENSE * 1e12)
    if kinds["routed_gemm"]:
        tokens_per_expert = TOKENS_PER_GPU * model.num_experts_per_tok / model.n_routed_experts
        routed_rate = fp8_grouped_rate(tokens_per_expert) * (1.0 if fp8 else BF16_DENSE / FP8_DENSE)
        seconds += kinds["routed_gemm"] / (routed_rate * 1e12)
    return seconds


def gpu_cost(model: ModelConfig, seq_len: int, with_mtp: bool) -> dict[str, float]:
    """H800 seconds per training token in bf16 and in FP8, and the effective TFLOPS each implies."""
    kinds = flops_by_kind(model, seq_len, with_mtp)
    flops = sum(kinds.values())
    bf16, fp8 = (seconds_per_token(kinds, model, fp8) for fp8 in (False, True))
    return {
        "seconds_per_token_bf16": bf16,
        "seconds_per_token_fp8": fp8,
        "effective_tflops_bf16": flops / bf16 / 1e12,
        "effective_tflops_fp8": flops / fp8 / 1e12,
    }
