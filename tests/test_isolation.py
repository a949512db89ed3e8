"""The suite's own hygiene: nothing a test does reaches the user's files, and no test's result depends on which
tests ran before it in the same process."""

from __future__ import annotations

import os
from pathlib import Path


def test_the_corpus_cache_is_the_sessions_own(tmp_path_factory):
    """Even when the shell that runs pytest sets NANOSEEK_CACHE (a `setdefault` kept it, and the suite wrote there)."""
    assert Path(os.environ["NANOSEEK_CACHE"]).is_relative_to(tmp_path_factory.getbasetemp())


def test_a_refused_scaled_mm_is_forgotten_after_its_test():
    """Here the FP8 GEMM learns that torch._scaled_mm refused (as on a GPU whose cuBLAS lacks fp32 output)..."""
    from nanoseek.fp8 import gemm

    gemm._scaled_mm_refused.append("refused in an earlier test")
    gemm._blockwise_trusted[True] = False


def test_the_next_test_starts_trusting_scaled_mm_again():
    """...and the next test must not inherit it: it would silently run the emulation instead of the kernel."""
    from nanoseek.fp8 import gemm

    assert not gemm._scaled_mm_refused and not gemm._blockwise_trusted
