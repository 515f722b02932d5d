"""Frechet distance, KID and the feature statistics they are computed from.

Everything here is float64 and knows nothing about networks or ranks: features come in, numbers come
out, so the formulas can be checked against an independent implementation on random data.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import torch

from rgan_dist.errors import UsageError

# Relative residual ||X X - A||_F / ||A||_F above which a matrix square root is not trusted and the
# eps * I fix-up is applied. A healthy root of a 2048^2 covariance product is accurate to ~1e-14.
SQRTM_TOLERANCE = 1e-6
# Largest |imaginary part| on the root's diagonal that is dropped as round-off (TTUR's threshold).
IMAG_TOLERANCE = 1e-3
# Variance left below this fraction of the largest variance is the null space of a covariance (see
# _range_basis); dropping it changes the distance by far less than 1e-6 of its scale.
SUPPORT_RTOL = 1e-12

# Keys of FeatureStats.meta that must agree before two statistics may be compared.
COMPAT_KEYS = ("network_sha256", "resolution", "resize")


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, float]:
    prod = sigma1 @ sigma2
    root = scipy.linalg.sqrtm(prod)
    if not np.all(np.isfinite(root)):
        return root, math.inf
    norm = np.linalg.norm(prod)
    resid = np.linalg.norm(root @ root - prod) / norm if norm > 0 else 0.0
    return root, float(resid)


def _range_basis(sigma: np.ndarray) -> np.ndarray:
    """Orthonormal basis (columns) of the numerical range of a covariance.

    Pivoted Cholesky (LAPACK ?pstrf) stops at the numerical rank r, so it costs O(d^2 r): 0.2 s for a
    rank-63 2048^2 covariance where an eigendecomposition takes 1-10 s on a loaded 2-core CPU. Pivots
    (remaining variances) below SUPPORT_RTOL times the largest variance end it.
    """
    d = sigma.shape[0]
    top = float(np.max(np.diagonal(sigma))) if d else 0.0
    if top <= 0.0:
        return np.zeros((d, 0))
    factor, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma, lower=1, tol=top * SUPPORT_RTOL)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed on a covariance (LAPACK info {info})")
    if rank >= d:
        return np.eye(d)
    lower = np.tril(factor)[:, :rank]
    permuted = np.empty_like(lower)
    permuted[piv - 1] = lower  # sigma = P L L' P', so range(sigma) = range(P L)
    q, _ = np.linalg.qr(permuted)
    return q


def _compress(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two matrices whose product has the nonzero eigenvalues of S1 S2, hence the same Tr sqrtm, as
    small as the lower of the two ranks; (S1, S2) themselves when both are full rank.

    With n samples a covariance has rank <= n - 1, so below 2048 samples S1 S2 is singular: scipy's
    sqrtm then runs in complex Schur arithmetic (35-75 s for 2048^2 on a 2-core CPU against ~12 s for a
    full-rank product) and is inaccurate at the zero eigenvalues. With Q an orthonormal basis of
    range(S1), S1 S2 = Q (Q'S1Q) Q'S2 has the nonzero eigenvalues of (Q'S1Q)(Q'S2Q) (cyclic
    similarity), and S1 S2 is similar to the PSD matrix S1^1/2 S2 S1^1/2, so Tr sqrtm is the sum of the
    square roots of those eigenvalues either way. The same holds with the roles swapped (S1 S2 and
    S2 S1 share eigenvalues), so the lower-rank side is used: then the small product is nonsingular
    for generic data, and the result exact and fast.
    """
    q1, q2 = _range_basis(sigma1), _range_basis(sigma2)
    d = sigma1.shape[0]
    if q1.shape[1] == d and q2.shape[1] == d:
        return sigma1, sigma2
    if q1.shape[1] <= q2.shape[1]:
        return q1.T @ sigma1 @ q1, q1.T @ sigma2 @ q1
    return q2.T @ sigma2 @ q2, q2.T @ sigma1 @ q2


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> tuple[float, dict[str, Any]]:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, with scipy.linalg.sqrtm.

    When the square root of the product is not finite or not accurate (relative residual above
    SQRTM_TOLERANCE: a near-singular product), it is recomputed with eps * I added to both covariances
    (the TTUR fix-up) and `info["fixup"]` says so, because the value is then slightly biased and
    whoever reads it should know. A small imaginary part of the root is round-off and is dropped; a
    large one means broken statistics and raises. A rank-deficient covariance (fewer samples than
    dimensions) is first compressed to its range (`_compress`), which leaves Tr sqrtm(S1 S2) unchanged.

    info: fixup (bool), eps (float or None), dim (size of the matrices sqrtm was applied to),
    sqrtm_residual (relative, of the root that was used), max_imag (largest |imag| on the root's
    diagonal before it was dropped).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} has non-finite entries")

    s1, s2 = _compress(sigma1, sigma2)
    k = s1.shape[0]
    root, resid = _sqrtm_product(s1, s2)
    info: dict[str, Any] = {"fixup": False, "eps": None, "dim": k}
    if not resid <= SQRTM_TOLERANCE:
        offset = np.eye(k) * eps
        root, resid = _sqrtm_product(s1 + offset, s2 + offset)
        info.update(fixup=True, eps=eps)
        if not np.all(np.isfinite(root)):
            raise ValueError("matrix square root is not finite even after the eps * I fix-up")
    max_imag = 0.0
    if np.iscomplexobj(root):
        max_imag = float(np.max(np.abs(np.diagonal(root).imag)))
        if max_imag > IMAG_TOLERANCE:
            raise ValueError(f"matrix square root has an imaginary component of {max_imag:.3g} on its diagonal")
        root = root.real
    info.update(sqrtm_residual=resid, max_imag=max_imag)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))
    return value, info


def kid(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    *,
    seed: int = 0,
) -> tuple[float, float | None]:
    """Kernel Inception Distance (Binkowski et al., 2018): unbiased MMD^2 with the cubic polynomial
    kernel k(x, y) = (x.y / d + 1)^3, over random subsets drawn without replacement.

    Returns (mean, std) over the subsets. subset_size is clamped to both sample counts, so small sets
    work (with a larger spread). The subsets come from a generator seeded with `seed`: same inputs,
    same value. The std is None where no spread is defined: fewer than 2 subsets, or both sets no larger
    than the subset, so every "subset" is the whole of both sets and the same value (its std was ~1e-16,
    shown as "+- 0.00000", which reads as a perfectly certain value); then one subset is computed.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature shapes do not match: {a.shape} vs {b.shape}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {a.shape[0]} and {b.shape[0]}")
    d = a.shape[1]
    if not kid_has_spread(num_subsets, m, a.shape[0], b.shape[0]):
        num_subsets = 1
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for s in range(num_subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[s] = within - 2.0 * kxy.sum() / (m * m)
    return float(values.mean()), (float(values.std()) if num_subsets > 1 else None)


def kid_has_spread(num_subsets: int, subset_size: int, n_a: int, n_b: int) -> bool:
    """Whether KID's subsets can differ, so that their std says something: at least 2 subsets, and one side
    holds more samples than a subset (`subset_size`, already clamped to both counts)."""
    return num_subsets >= 2 and max(n_a, n_b) > subset_size


def kid_spread(result: dict[str, Any], digits: int) -> str:
    """" +- std" after a KID value, or "" where no spread is defined (`fid.kid`: too few samples for the
    subsets to differ), so a single value never reads as an exact one."""
    std = result.get("kid_std")
    return f" +- {std:.{digits}f}" if std is not None else " (no spread: every subset is all samples)"


@dataclass
class FeatureStats:
    """mu / sigma (float64) of n feature vectors, the provenance needed to compare them, and the raw
    features (float32) only when KID is wanted: 50k x 2048 features are 400 MB, the moments 32 MB.

    meta carries at least network_sha256, network_source, network_path, resolution, resize and n.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None

    @classmethod
    def from_features(
        cls, feats: np.ndarray | torch.Tensor, *, meta: dict[str, Any] | None = None, keep_features: bool = False
    ) -> FeatureStats:
        """Moments in float64. A torch tensor is reduced on its own device: on a GPU the 50k x 2048
        covariance takes milliseconds instead of ~10 s of CPU."""
        if feats.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(feats.shape)}")
        n = int(feats.shape[0])
        if n < 2:
            raise UsageError(f"FID needs at least 2 images per side, got {n}")
        t = torch.as_tensor(feats).detach()
        f64 = t.to(torch.float64)
        mu = f64.mean(dim=0)
        centred = f64 - mu
        sigma = centred.T @ centred / (n - 1)
        sigma = (sigma + sigma.T) / 2  # exact symmetry, whatever the GEMM's summation order
        meta = dict(meta or {})
        meta["n"] = n
        kept = t.to(torch.float32).cpu().numpy() if keep_features else None
        return cls(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), n=n, meta=meta, features=kept)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an .npz atomically, so a reader on another rank or run never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "n": np.int64(self.n),
            "meta_json": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        if self.features is not None:
            arrays["features"] = self.features
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta_json"]))
                feats = z["features"] if "features" in z.files else None
                return cls(mu=z["mu"], sigma=z["sigma"], n=int(z["n"]), meta=meta, features=feats)
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"{path} is not a feature-statistics file written by rgan-dist: {e}") from e

    def check_compatible(self, other: FeatureStats) -> None:
        """Refuse statistics made with different networks or preprocessing: the number would look like an
        FID and mean nothing."""
        for key in COMPAT_KEYS:
            a, b = self.meta.get(key), other.meta.get(key)
            if a is not None and b is not None and a != b:
                raise UsageError(f"cannot compare feature statistics: {key} differs ({a!r} vs {b!r})")


def compare_stats(
    a: FeatureStats,
    b: FeatureStats,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
) -> dict[str, Any]:
    """FID (and KID when both sides kept their features) with the provenance every value must carry.

    Keys (the record that tracking and reports log): fid, fid_fixup, fid_info, kid, kid_std (None
    without features), n_a, n_b, network_source, network_path, network_sha256, resize, resolution.
    """
    a.check_compatible(b)
    value, info = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    out: dict[str, Any] = {"fid": value, "fid_fixup": info["fixup"], "fid_info": info}
    if a.features is not None and b.features is not None:
        out["kid"], out["kid_std"] = kid(
            a.features, b.features, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=kid_seed
        )
    else:
        out["kid"], out["kid_std"] = None, None
    out["n_a"], out["n_b"] = a.n, b.n
    meta = {**b.meta, **a.meta}
    for key in ("network_source", "network_path", "network_sha256", "resize", "resolution"):
        out[key] = meta.get(key)
    return out
