import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def private_corpus_cache(tmp_path_factory):
    """Tests that prepare a corpus without naming a cache of their own share one under pytest's temporary directory,
    never the user's ~/.cache/nanoseek (which would make the tests depend on what an earlier run left there)."""
    os.environ.setdefault("NANOSEEK_CACHE", str(tmp_path_factory.mktemp("nanoseek-cache")))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` check the GPU paths (benchmarks/gpu_check.sh runs them); elsewhere they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
