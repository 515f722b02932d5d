"""The FID protocol (issue 9, part 1): the reference is the data as training sees it, cached statistics
belong to one shard set, the EMA generator's BatchNorm statistics are its own, the sampling mode is a
setting that the paper table checks, and every value carries its protocol.

A small stand-in network wrapped in the real `InceptionNetwork` (same preprocessing and code paths):
what is checked is the bookkeeping around the network, not the network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rgan_dist.metrics.evaluator import reference_stats
from rgan_dist.metrics.features import STATS_PREFIX, dataset_stats
from rgan_dist.metrics.fid import FeatureStats
from rgan_dist.metrics.inception import InceptionInfo, InceptionNetwork

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path / "cache"))


class _Counting(nn.Module):
    """[B,3,299,299] -> [B,16]: a fixed random conv + projection (sensitive to detail, not only to the
    mean colour, so a change of resolution shows); counts the images it embeds."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 9, stride=8)
        self.proj = nn.Linear(4 * 8 * 8, 16)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        y = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 8)
        return self.proj(y.flatten(1))


def _net() -> InceptionNetwork:
    info = InceptionInfo(source="test stand-in", path="<memory>", sha256="c" * 64, convention="tf-range-299")
    return InceptionNetwork(_Counting().eval(), info, torch.device("cpu"))


def _images(n: int, side: int, seed: int) -> torch.Tensor:
    """n real digits at `side` px with per-image noise: fine detail that a downscale changes."""
    from sklearn.datasets import load_digits

    d = torch.from_numpy(load_digits().images[seed : seed + n].astype(np.float32) / 16.0)[:, None]
    x = nn.functional.interpolate(d, size=(side, side), mode="bilinear", align_corners=False)
    noise = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 0.3
    return ((x.repeat(1, 3, 1, 1) * 0.7 + noise).clamp(0, 1) * 255).round().to(torch.uint8)


def _shards(folder: Path, out: Path, images: torch.Tensor, *, overwrite: bool = False) -> Path:
    from PIL import Image

    from data_pipeline.writer import write_shards

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    write_shards([str(folder)], out, images.shape[-1], fmt="png", shard_size=5, shuffle=False, progress=False,
                 overwrite=overwrite)
    return out


# ---------------------------------------------------------------------------- reference resolution


def test_reference_of_32px_shards_for_a_16px_model_uses_16px_reals_decoded_the_training_way(tmp_path):
    from data_pipeline.reader import make_batch_iterator

    n = 12
    shards = _shards(tmp_path / "imgs", tmp_path / "shards", _images(n, 32, seed=0))
    net = _net()
    ref = reference_stats(str(shards), net, resolution=16, num_samples=n, batch_size=5, keep_features=False)

    # What training sees: the training reader at model.resolution (one batch holds the whole epoch; FID
    # statistics do not depend on the order)
    it = make_batch_iterator(str(shards), batch_size=n, resolution=16, rank=0, world_size=1, workers=0)
    batch = next(it)
    assert tuple(batch.shape) == (n, 3, 16, 16)
    seen = FeatureStats.from_features(net.embed(batch))
    np.testing.assert_allclose(ref.mu, seen.mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref.sigma, seen.sigma, rtol=1e-4, atol=1e-6)
    assert ref.n == n and ref.meta["image_resolution"] == 16 and ref.meta["data_resolution"] == 32

    native = dataset_stats(str(shards), network=net, num_samples=n, cache=False)  # 32 px, as stored
    assert np.abs(native.mu - seen.mu).max() > 1e-3
    # another decode size is another cache entry
    assert len(list(shards.glob(f"{STATS_PREFIX}_*.npz"))) == 1
    reference_stats(str(shards), net, resolution=8, num_samples=n, batch_size=5, keep_features=False)
    assert len(list(shards.glob(f"{STATS_PREFIX}_*.npz"))) == 2


# --------------------------------------------------------------------------- stale reference cache


def test_rewritten_shards_recompute_the_reference_statistics(tmp_path):
    n = 10
    folder, shards = tmp_path / "imgs", tmp_path / "shards"
    _shards(folder, shards, _images(n, 16, seed=0))
    net = _net()
    first = reference_stats(str(shards), net, resolution=16, num_samples=n, batch_size=5, keep_features=False)
    (old_cache,) = shards.glob(f"{STATS_PREFIX}_*.npz")
    assert net.module.seen == n
    reference_stats(str(shards), net, resolution=16, num_samples=n, batch_size=5, keep_features=False)
    assert net.module.seen == n  # unchanged shards: reused
    stale = tmp_path / "stale.npz"
    shutil.copy(old_cache, stale)

    # `rgan shards --out` over the old set, with other images
    _shards(folder, shards, _images(n, 16, seed=100), overwrite=True)
    assert not list(shards.glob(f"{STATS_PREFIX}_*.npz"))  # the writer removed what it invalidated
    second = reference_stats(str(shards), net, resolution=16, num_samples=n, batch_size=5, keep_features=False)
    assert net.module.seen == 2 * n  # recomputed
    fresh = dataset_stats(str(shards), network=net, num_samples=n, resolution=16, cache=False)
    np.testing.assert_allclose(second.mu, fresh.mu, rtol=1e-5, atol=1e-6)
    assert np.abs(second.mu - first.mu).max() > 1e-3

    # a stale file put back under the new name is still refused: the identity inside it is checked
    (new_cache,) = shards.glob(f"{STATS_PREFIX}_*.npz")
    shutil.copy(stale, new_cache)
    third = reference_stats(str(shards), net, resolution=16, num_samples=n, batch_size=5, keep_features=False)
    assert net.module.seen == 4 * n
    np.testing.assert_allclose(third.mu, fresh.mu, rtol=1e-5, atol=1e-6)
