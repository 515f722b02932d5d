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
from conftest import DEMO, ROOT, TINY
from stand_ins import stand_in_network
from torch import nn

from rgan_dist.errors import UsageError
from rgan_dist.metrics.evaluator import reference_stats
from rgan_dist.metrics.features import STATS_PREFIX, dataset_stats
from rgan_dist.metrics.fid import FeatureStats


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path / "cache"))


def _net():
    return stand_in_network(features=16, sha256="c" * 64)


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
    assert ref.n == n and ref.meta["image_resolution"] == 16 and ref.meta["stored_resolution"] == 32

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


# ------------------------------------------------------------------ EMA generator's BatchNorm statistics

BASE = [*TINY, "train.batch_size=8", "train.log_every=1", "tracking.enabled=false", "train.sample_every=0",
        "checkpoint.every=0", "train.ema=0.9", "eval.batch_size=16"]


def _cfg(tmp_path: Path, *extra: str):
    from rgan_dist.config import load_config

    return load_config(DEMO, [*BASE, f"run.out_dir={tmp_path}/run", *extra])


def _norms(G: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _bn_inputs(G: nn.Module, z: torch.Tensor, *, train_mode: bool) -> list[torch.Tensor]:
    """The input of every BatchNorm layer of G for latents z, as [batches, C, values] (hooks on a copy:
    train mode would update G's own running statistics)."""
    import copy

    G = copy.deepcopy(G)
    norms, seen = _norms(G), {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, i=i: seen.setdefault(i, []).append(inp[0].detach()))
             for i, m in enumerate(norms)]
    G.train(train_mode)
    try:
        with torch.no_grad():
            for chunk in z.split(z.shape[0] if not train_mode else 16):
                G(chunk)
    finally:
        for h in hooks:
            h.remove()
    return [torch.stack([x.transpose(0, 1).flatten(1) for x in seen[i]]) for i in range(len(norms))]


def test_ema_generator_is_evaluated_with_batch_norm_statistics_of_its_own_weights(tmp_path):
    """After training steps, the EMA G handed to the evaluator (and drawn in the sample grid) has the
    BatchNorm statistics of its own activations, not the live G's copies."""
    from rgan_dist.engine.loop import Trainer

    judged: dict[str, nn.Module] = {}

    def evaluator(step: int, generator: nn.Module) -> dict[str, float]:
        import copy

        judged["G"] = copy.deepcopy(generator)
        return {"fid": 1.0}

    cfg = _cfg(tmp_path, "train.steps=30", "eval.every=30")
    trainer = Trainer(cfg, evaluator=evaluator)
    trainer.fit()
    G, live = judged["G"], trainer.strategy.G
    norms = _norms(G)
    assert norms

    # 1. in eval mode over fresh latents, each layer's input has the running statistics' mean and variance
    fresh = torch.randn(2048, cfg.model.z_dim, generator=torch.Generator().manual_seed(7))
    for m, x in zip(norms, _bn_inputs(G, fresh, train_mode=False), strict=True):
        x = x[0]
        ratio = float((m.running_var / x.var(1)).mean())
        assert 0.95 < ratio < 1.05, ratio  # the live G's copies: 1.3 and 1.6 here
        assert float(((m.running_mean - x.mean(1)).abs() / x.std(1)).mean()) < 0.02
    # 2. exactly: the cumulative average of train-mode batch statistics over the recalibration latents
    from rgan_dist.ema import BN_SEED_OFFSET

    n_batches = [m.num_batches_tracked.item() for m in norms]
    gen = torch.Generator().manual_seed(cfg.train.seed + BN_SEED_OFFSET)
    z = torch.cat([torch.randn(16, cfg.model.z_dim, generator=gen) for _ in range(n_batches[0])])
    for m, x in zip(norms, _bn_inputs(G, z, train_mode=True), strict=True):
        torch.testing.assert_close(m.running_mean, x.mean(2).mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, x.var(2).mean(0), rtol=1e-4, atol=1e-5)
    # 3. not the live G's statistics
    for m, m_live in zip(norms, _norms(live), strict=True):
        assert not torch.allclose(m.running_var, m_live.running_var, rtol=0.02)
    # 4. the sample grid draws the same recalibrated EMA G
    trainer.save_samples()
    for m, m_ema in zip(norms, _norms(trainer.ema.module), strict=True):
        torch.testing.assert_close(m.running_var, m_ema.running_var)


# --------------------------------------------------------------------------------- sampling mode


def test_paper_presets_use_the_papers_sampling_and_other_protocols_get_no_paper_value():
    from rgan_dist.config import load_config
    from rgan_dist.paper_reference import beside_paper, paper_fid

    c = load_config(ROOT / "configs" / "paper" / "cifar10.yaml", ["loss.name=rsgan", "loss.penalty=wgan-gp"])
    assert (c.eval.g_mode, c.eval.batch_size) == ("train", 100)
    for name in ("cat64", "cat128", "cat256"):
        cat = load_config(ROOT / "configs" / "paper" / f"{name}.yaml")
        assert (cat.eval.g_mode, cat.eval.batch_size) == ("train", 100)
    params = c.flat()
    assert paper_fid("cifar10", params).fid == 25.60
    for other in ({"eval.g_mode": "eval"}, {"eval.batch_size": 50}):
        assert paper_fid("cifar10", {**params, **other}) is None
    assert paper_fid("cifar10", {k: v for k, v in params.items() if k != "eval.g_mode"}) is None  # unknown
    text = beside_paper([("ours", {**params, "eval.g_mode": "eval"}, 30.0)], "cifar10")
    assert "| ours | rsgan + wgan-gp | (FID protocol differs from the paper's: eval.g_mode=train" in text
    assert "25.60" not in text


def test_train_mode_sampling_uses_batch_statistics_and_leaves_running_statistics_alone():
    from rgan_dist.metrics.evaluator import digits_reference_stats, evaluate_generator
    from rgan_dist.models import build_models

    torch.manual_seed(3)
    G, _ = build_models("dcgan", resolution=16, z_dim=16, width=8, channels=1)
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            G(torch.randn(8, 16) * 3 + 1)
    G.eval()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    net = _net()
    ref = digits_reference_stats(net, resolution=16, num_samples=12, batch_size=6, keep_features=False)
    kw = dict(num_samples=12, z_dim=16, seed=1, batch_size=6, kid=False)
    in_eval = evaluate_generator(G, net, ref, **kw, g_mode="eval", ema=False)
    in_train = evaluate_generator(G, net, ref, **kw, g_mode="train", ema=False)
    assert not G.training
    for k, v in G.state_dict().items():  # running statistics untouched by train-mode sampling
        assert torch.equal(v, before[k]), k
    assert in_train["fid"] != pytest.approx(in_eval["fid"], rel=1e-3)  # batch statistics: another G output
    assert (in_train["g_mode"], in_train["g_batch_size"], in_eval["g_mode"]) == ("train", 6, "eval")
    again = evaluate_generator(G, net, ref, **kw, g_mode="train", ema=False)
    assert again["fid"] == in_train["fid"]  # deterministic: same latents, same batches
    with pytest.raises(UsageError, match="g_mode"):
        evaluate_generator(G, net, ref, **kw, g_mode="sample")


# ----------------------------------------------------------------------------- recorded protocol


def test_every_fid_value_is_logged_with_its_protocol(tmp_path, monkeypatch):
    """metrics.jsonl's FID record and the MLflow run carry N, network sha256, resize, G mode, EMA, the
    resolution the reals were decoded at and the shards' image format."""
    import json

    from mlflow import MlflowClient

    from rgan_dist.engine.loop import train
    from rgan_dist.metrics.evaluator import FidEvaluator

    shards = _shards(tmp_path / "imgs", tmp_path / "shards", _images(24, 32, seed=0))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(tmp_path, "train.steps=2", "eval.every=2", "eval.num_samples=6", "eval.batch_size=3",
               "eval.reference_samples=8", "eval.g_mode=train", "model.channels=3", "data.workers=0",
               f"data.shards={shards}", "tracking.enabled=true", f"tracking.mlflow_uri={uri}")

    class StandIn(FidEvaluator):
        def __init__(self, cfg) -> None:
            super().__init__(cfg, progress=False, inception=None)
            self.net = _net()

    import rgan_dist.metrics.evaluator as ev

    monkeypatch.setattr(ev, "resolve_inception", lambda path=None: None)  # the stand-in needs no weights file
    train(cfg, evaluator=StandIn(cfg))
    (record,) = [r for r in map(json.loads, (cfg.out_dir / "metrics.jsonl").read_text().splitlines()) if "fid" in r]
    p = record["context"]
    assert (p["fid.num_samples"], p["fid.reference_samples"]) == ("6", "8")
    assert p["fid.network_sha256"] == "c" * 64 and p["fid.resize"] == "tf1-bilinear"
    assert (p["fid.g_mode"], p["fid.g_batch_size"], p["fid.ema"]) == ("train", "3", "True")
    assert (p["fid.data_resolution"], p["fid.stored_resolution"], p["fid.image_format"]) == ("16", "32", "png")
    assert len(p["fid.reference_dataset_sha256"]) == 64
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert p.items() <= run.data.tags.items()
    assert run.data.params["eval.g_mode"] == "train"
