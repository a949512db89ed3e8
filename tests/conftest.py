import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_corpus_cache(tmp_path_factory):
    """Tests that prepare a corpus without naming a cache of their own share one under pytest's temporary directory,
    never the user's cache: not ~/.cache/nanoseek, and not the NANOSEEK_CACHE of the shell that runs the suite
    (which would make the tests write there, and depend on what an earlier run left)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOSEEK_CACHE", str(tmp_path_factory.mktemp("nanoseek-cache")))
        yield


@pytest.fixture(autouse=True)
def fresh_fp8_backend_state():
    """The FP8 GEMM remembers, for the rest of the process, that torch._scaled_mm refused or disagreed once; each
    test starts without that memory, so no result depends on which test ran first."""
    from nanoseek.fp8 import gemm

    gemm._scaled_mm_refused.clear()
    gemm._blockwise_trusted.clear()
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` check the GPU paths (benchmarks/gpu_check.sh runs them); elsewhere they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
