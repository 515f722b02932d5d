"""`modes`: how many of Stacked-Digits' 1000 modes a set of images covers, and its reverse KL to uniform.

The StackedMNIST protocol (VEEGAN, PacGAN, R3GAN) with scikit-learn's digits in place of MNIST: classify
each of the R, G, B channels as a digit, call 100 * d_R + 10 * d_G + d_B the image's mode, and report
- `modes`: the number of modes holding at least one of the N images (N = 26,000 by default, as the papers);
- `modes_kl`: KL(p_model || uniform) = sum_k p_k log(p_k * 1000) over the modes with p_k > 0, in nats
  (0 for a perfectly uniform histogram; log 1000 = 6.91 for a single mode).
The sample count matters: even perfect data drawn uniformly leaves ~1000 * exp(-N/1000) modes empty and
has KL ~ 999 / (2N) (0.019 at 26k), so compare values only at the same N.

Where a KL comes from (`decompose`): because uniform over 1000 modes is the product of three uniform digits,
KL(p || uniform) splits exactly into the three channels' digit KLs, KL(p_c || uniform over 10), plus the
total correlation between channels, KL(p || p_R p_G p_B). A generator that draws some digits too often in
every channel shows up in the first part; one that ties the channels' digits together, in the second. The
sampling floor sits almost all in the second part: at 26k samples each channel's part is ~9 / (2N) = 0.0002.

The classifier is an RBF SVC fitted at first use on sklearn's digits *as a stack carries them*: each 8x8
digit (0..16, scaled to 0..255) goes through `data_pipeline.sources.stack_digits` (PIL bilinear up to
R x R) and back down to 8x8 by area averaging, the exact path a stack's channel takes at scoring time. One
classifier per resolution R, fitted on a fixed stratified 75% of the digits; its accuracy on the other
25% is reported with every value (`modes_classifier_accuracy`): with ~99.5% per channel, about 1.5% of
real stacks get one digit wrong, which lands them in a neighbouring mode (it cannot hide a missing mode
unless the errors happen to fill it; it can add spurious coverage and KL, so the metric is trustworthy
for collapse, i.e. coverage far below 1000, not for the last few modes).

Fitting takes well under a second; the fitted model is still cached, like the FID statistics, in the
project's cache root (`data_pipeline.shardset.cache_root`), keyed on the scikit-learn version, the fit
settings and R: a cache written under other settings or another scikit-learn is refitted, never trusted.
Scoring runs on CPU numpy in batches: 26,000 stacks are 78,000 SVC predictions (seconds; see the test).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rgan_dist.config import EvalConfig
from rgan_dist.errors import UsageError

NUM_MODES = 1000
DEFAULT_NUM_SAMPLES: int = EvalConfig.modes_samples  # 26,000: the protocol's N, defined once in the config
# Everything the fitted classifier depends on besides R and the scikit-learn version: part of the cache key.
FIT_SETTINGS: dict[str, Any] = {"model": "SVC", "kernel": "rbf", "gamma": 0.002, "C": 5.0, "test_size": 0.25,
                                "split_seed": 0, "features": "area-8x8 of bilinear-R, 0..16", "version": 1}
_BATCH = 4096


@dataclass
class DigitClassifier:
    """The fitted per-channel digit classifier for R x R stacks, with its held-out accuracy."""

    model: Any  # sklearn.svm.SVC
    resolution: int
    held_out_accuracy: float
    held_out_count: int
    key: dict[str, Any]
    cache: str | None = None

    def digits(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, R, R, 3] stacks -> int [N, 3] digits (R, G, B channel)."""
        n = images.shape[0]
        feats = channel_features(images, self.resolution)  # [N * 3, 64]
        return self.model.predict(feats).astype(np.int64).reshape(n, 3)

    def modes(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, R, R, 3] stacks -> int [N] modes 100 * d_R + 10 * d_G + d_B."""
        return self.digits(images) @ np.array([100, 10, 1])


def channel_features(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [N, R, R, 3] -> float [N * 3, 64]: each channel area-averaged to 8x8 and scaled to sklearn's
    0..16 (rows ordered image-major: image 0's R, G, B, then image 1's...)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (resolution, resolution, 3):
        raise UsageError(f"modes: expected RGB {resolution}x{resolution} images, got an array of shape "
                         f"{tuple(images.shape)}")
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # [N, 3, R, R]
    small = F.adaptive_avg_pool2d(x, 8) if resolution != 8 else x  # area: exact block means when 8 | R
    return small.reshape(-1, 64).numpy().astype(np.float64) * (16.0 / 255.0)


# ------------------------------------------------------------------------------------ classifier


def _cache_key(resolution: int) -> dict[str, Any]:
    import sklearn

    return {**FIT_SETTINGS, "resolution": int(resolution), "sklearn": sklearn.__version__}


def _cache_path(key: dict[str, Any]) -> Path:
    from data_pipeline.shardset import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "modes-classifier" / f"svc-r{key['resolution']}-{digest}.pkl"


def fit_classifier(resolution: int) -> DigitClassifier:
    """Fit the SVC on the round-tripped digits (module docstring); deterministic."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    from data_pipeline.sources import digits_arrays, stack_digits

    images, labels = digits_arrays()
    # A stack of three copies of each digit: its channels are the digit round-tripped through R x R.
    stacks = np.stack([stack_digits(d, d, d, resolution=resolution) for d in images])
    feats = channel_features(stacks, resolution)[0::3]
    s = FIT_SETTINGS
    train, test = train_test_split(np.arange(len(labels)), test_size=s["test_size"], random_state=s["split_seed"],
                                   stratify=labels)
    model = SVC(kernel=s["kernel"], gamma=s["gamma"], C=s["C"]).fit(feats[train], labels[train])
    accuracy = float((model.predict(feats[test]) == labels[test]).mean())
    return DigitClassifier(model, resolution, accuracy, len(test), _cache_key(resolution))


_loaded: dict[int, DigitClassifier] = {}


def load_classifier(resolution: int, *, cache: bool = True) -> DigitClassifier:
    """The classifier for R x R stacks: from memory, else the disk cache if its key matches, else fitted
    (and written to the cache; a read-only cache only costs the fit next time)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise UsageError(f"modes: stacks must be at least 8x8 pixels, got resolution {resolution!r}")
    if cache and resolution in _loaded:
        return _loaded[resolution]
    key = _cache_key(resolution)
    path = _cache_path(key)
    clf = None
    if cache and path.is_file():
        try:
            with open(path, "rb") as f:
                found = pickle.load(f)
            if isinstance(found, DigitClassifier) and found.key == key:
                clf = found
        except Exception:  # truncated or written by other code: refit
            clf = None
    if clf is None:
        clf = fit_classifier(resolution)
        if cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")  # ranks may race: each renames its own
                with open(tmp, "wb") as f:
                    pickle.dump(clf, f)
                tmp.replace(path)
            except OSError as e:
                print(f"rgan: note: cannot cache the modes classifier at {path}: {e}", flush=True)
    clf.cache = str(path) if cache else None
    if cache:
        _loaded[resolution] = clf
    return clf


# ---------------------------------------------------------------------------------------- metric


def mode_histogram(batches: Iterable[np.ndarray], *, classifier: DigitClassifier | None = None,
                   limit: int | None = None) -> tuple[np.ndarray, DigitClassifier | None]:
    """Counts [1000] of the modes of uint8 [b, R, R, 3] batches (R from the first batch), at most `limit`
    images; returns the classifier used (None when no image came)."""
    counts = np.zeros(NUM_MODES, dtype=np.int64)
    seen = 0
    for batch in batches:
        batch = np.asarray(batch)
        if limit is not None:
            batch = batch[: limit - seen]
        if batch.shape[0] == 0:
            continue
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.shape[1] != batch.shape[2]:
            raise UsageError(f"modes: needs square RGB Stacked-Digits images, got a batch of shape {batch.shape}")
        if classifier is None:
            classifier = load_classifier(int(batch.shape[1]))
        counts += np.bincount(classifier.modes(batch), minlength=NUM_MODES)
        seen += batch.shape[0]
        if limit is not None and seen >= limit:
            break
    return counts, classifier


def summarize(counts: np.ndarray) -> dict[str, float]:
    """{modes, modes_kl} of a mode histogram (module docstring)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise UsageError("modes: no images to score")
    return {"modes": float((counts > 0).sum()), "modes_kl": _kl_to_uniform(counts.reshape(-1) / total)}


def _kl_to_uniform(p: np.ndarray) -> float:
    """KL(p || uniform over len(p)) in nats, over the entries with p > 0."""
    q = p[p > 0]
    return float(np.sum(q * np.log(q * len(p))))


def decompose(counts: np.ndarray) -> dict[str, Any]:
    """`modes_kl` of a mode histogram split exactly (module docstring): `modes_kl_channels` [R, G, B], each
    channel's digit KL to uniform; `modes_kl_between`, the total correlation (modes_kl minus their sum);
    `modes_digit_share` [3][10], each channel's digit frequencies."""
    counts = np.asarray(counts, dtype=np.float64).reshape(10, 10, 10)
    total = counts.sum()
    if total <= 0:
        raise UsageError("modes: no images to score")
    p = counts / total
    shares = [p.sum(axis=tuple(a for a in range(3) if a != c)) for c in range(3)]
    per_channel = [_kl_to_uniform(q) for q in shares]
    return {"modes_kl_channels": per_channel, "modes_kl_between": _kl_to_uniform(p.reshape(-1)) - sum(per_channel),
            "modes_digit_share": [[float(v) for v in q] for q in shares]}


def score(batches: Iterable[np.ndarray], *, num_samples: int | None = DEFAULT_NUM_SAMPLES,
          classifier: DigitClassifier | None = None) -> dict[str, Any]:
    """The `modes` record of (up to `num_samples`) images given as uint8 [b, R, R, 3] batches:
    modes, modes_kl, modes_classifier_accuracy, num_samples (actually scored), resolution, seconds."""
    t0 = time.perf_counter()
    counts, clf = mode_histogram(batches, classifier=classifier, limit=num_samples)
    record: dict[str, Any] = {**summarize(counts), **decompose(counts)}
    assert clf is not None
    record.update(modes_classifier_accuracy=clf.held_out_accuracy, num_samples=int(counts.sum()),
                  resolution=clf.resolution, seconds=time.perf_counter() - t0)
    return record


def batched(images: Iterable[np.ndarray], size: int = _BATCH) -> Iterator[np.ndarray]:
    """Single HWC images -> stacked batches (cut where the shape changes, so a stray size fails clearly)."""
    pending: list[np.ndarray] = []
    for img in images:
        if pending and (len(pending) == size or img.shape != pending[0].shape):
            yield np.stack(pending)
            pending.clear()
        pending.append(img)
    if pending:
        yield np.stack(pending)


def describe(record: dict[str, Any]) -> str:
    """`modes: M/1000  kl: X` (the line `rgan modes` prints first), the protocol on a second line, then where
    the KL comes from: each channel's digit KL, the KL between channels, and each channel's digit shares."""
    lines = [f"modes: {int(record['modes'])}/{NUM_MODES}  kl: {record['modes_kl']:.4f}",
             f"N = {record['num_samples']} images at {record['resolution']}px; per-channel digit classifier "
             f"held-out accuracy {record['modes_classifier_accuracy']:.4f}"]
    parts = ", ".join(f"{c} {v:.4f}" for c, v in zip("RGB", record["modes_kl_channels"], strict=True))
    lines.append(f"kl = channels' digit KLs ({parts}) + between channels {record['modes_kl_between']:.4f}")
    for c, share in zip("RGB", record["modes_digit_share"], strict=True):
        lines.append(f"  {c} digits 0-9 (%): " + " ".join(f"{100 * v:4.1f}" for v in share))
    return "\n".join(lines)
