"""The metrics of `eval.metrics` in training, and FID/KID of a generator against its training data.

`make_evaluator` builds what the loop calls every `eval.every` steps from the registry `METRICS` (metric
name -> the evaluator that computes it): `FidEvaluator` for fid/kid, `ModesEvaluator` for Stacked-Digits'
modes (no Inception network), several of them combined by `EvaluatorSuite`. `rgan eval --checkpoint`
uses `evaluate_generator`. Both rest on `rgan_dist.metrics.features`: every rank
generates and embeds its share of the N samples, features are gathered in global order (so the value
does not depend on the world size), and FID/KID is computed once on rank 0 and broadcast, so every rank
takes the same best-checkpoint decision.

Reference statistics are those of the data the generator was trained on, as the loop sees it:
- a shard set: `dataset_stats` (first N images in manifest order, cached beside the manifest);
- `sklearn:digits`: the very tensor the loop trains on (`load_digits_uint8` at model.resolution), in a
  fixed shuffled order (the digits come grouped by writer), cached in the user cache folder under the
  same file name scheme (`stats_cache_name`: network sha256, resize, N) in a folder per resolution.

The latents of evaluation sample i depend only on (train.seed + EVAL_SEED_OFFSET, i // eval.batch_size),
so every evaluation of a run judges the same N latents (differences between steps are not sampling
noise) and `rgan eval` on a checkpoint reproduces the value the run logged.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from rgan_dist.errors import UsageError
from rgan_dist.metrics.features import (
    batch_seed,
    broadcast_from_rank0,
    compare_on_rank0,
    dataset_stats,
    gather_rows,
    generator_stats,
    network_meta,
    rank_world,
    share,
    stats_cache_name,
)
from rgan_dist.metrics.fid import FeatureStats, kid_spread
from rgan_dist.metrics.inception import FEATURE_DIM, InceptionNetwork, load_inception, resolve_inception
from rgan_dist.samples import to_uint8

if TYPE_CHECKING:
    from rgan_dist.config import Config
    from rgan_dist.tracking import Tracker

EVAL_SEED_OFFSET = 0x5EED
DIGITS = "sklearn:digits"


# ------------------------------------------------------------------------------------------ reference


def digits_reference_stats(net: InceptionNetwork, *, resolution: int, num_samples: int, batch_size: int,
                           keep_features: bool, progress: bool = False) -> FeatureStats:
    """Statistics of N in-memory training digits at `resolution`, identical on every rank (cached)."""
    from rgan_dist.data import load_digits_uint8

    images = load_digits_uint8(resolution, channels=1)  # grey: the network sees the channel repeated
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n = min(num_samples, len(images))
    from data_pipeline.shardset import cache_root

    path = cache_root() / "fid-reference" / f"sklearn-digits-r{resolution}" / stats_cache_name(net, n)
    rank, world = rank_world()
    found = None
    if rank == 0 and path.is_file():
        try:
            loaded = FeatureStats.load(path)
        except UsageError:
            loaded = None
        if loaded is not None and loaded.meta.get("network_sha256") == net.info.sha256 and loaded.n == n \
                and (loaded.features is not None or not keep_features):
            found = loaded
    found = broadcast_from_rank0(found)
    if found is not None:
        found.meta["cache"] = str(path)
        return found
    lo, hi = share(n, rank, world)
    feats = [net.embed(images[order[a : min(a + batch_size, hi)]]) for a in range(lo, hi, batch_size)]
    local = torch.cat(feats) if feats else torch.empty((0, FEATURE_DIM), device=net.device)
    every = gather_rows(local)
    meta = {**network_meta(net), "source": DIGITS, "source_kind": "in-memory", "image_resolution": resolution,
            "stored_resolution": 8, "image_format": "in-memory"}
    stats = FeatureStats.from_features(every, meta=meta, keep_features=keep_features)
    if rank == 0:
        try:
            stats.save(path)
            stats.meta["cache"] = str(path)
        except OSError as e:  # a read-only cache costs time next run, nothing else
            print(f"rgan: note: cannot cache FID reference statistics at {path}: {e}", flush=True)
    return stats


def reference_stats(data: str, net: InceptionNetwork, *, resolution: int, num_samples: int, batch_size: int,
                    keep_features: bool, progress: bool = False) -> FeatureStats:
    """The training data's reference statistics (module docstring), identical on every rank."""
    if data.startswith("sklearn:"):
        if data != DIGITS:
            raise UsageError(f"data {data!r}: the only embedded data set is {DIGITS}")
        return digits_reference_stats(net, resolution=resolution, num_samples=num_samples, batch_size=batch_size,
                                      keep_features=keep_features, progress=progress)
    # decoded at the model's resolution with the training reader's fit/resize: the reals the model saw
    return dataset_stats(data, network=net, num_samples=num_samples, batch_size=batch_size,
                         keep_features=keep_features, progress=progress, resolution=resolution)


# ----------------------------------------------------------------------------------------- generated


def sample_fn(generator: torch.nn.Module, z_dim: int) -> Any:
    """`compute_generator_features`' sample function for a G that maps z ~ N(0, I) to [-1, 1] images."""

    def sample(b: int, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(b, z_dim, generator=gen, device=gen.device)
        return to_uint8(generator(z))

    return sample


G_MODES = ("eval", "train")


@contextlib.contextmanager
def generator_mode(generator: torch.nn.Module, g_mode: str) -> Iterator[None]:
    """Put G in the mode evaluation samples in, and leave it exactly as found (mode and BN buffers).

    "eval": BatchNorm uses its running statistics, so a sample never depends on its batch. "train": batch
    statistics, as the paper's official code sampled; the running statistics that this updates are restored."""
    if g_mode not in G_MODES:
        raise UsageError(f"g_mode={g_mode!r}: choose one of {', '.join(G_MODES)}")
    was_training = generator.training
    saved = {k: b.clone() for k, b in generator.named_buffers()} if g_mode == "train" else {}
    generator.train(g_mode == "train")
    try:
        yield
    finally:
        generator.train(was_training)
        with torch.no_grad():
            for k, b in generator.named_buffers():
                if k in saved:
                    b.copy_(saved[k])


def evaluate_generator(generator: torch.nn.Module, net: InceptionNetwork, reference: FeatureStats, *,
                       num_samples: int, z_dim: int, seed: int, batch_size: int, kid: bool,
                       progress: bool = False, g_mode: str = "eval", ema: bool | None = None) -> dict[str, Any]:
    """compare_stats' record (fid, kid, n_a, n_b, network_*, resize, ...) plus the protocol keys
    (`PROTOCOL_KEYS`), identical on every rank.

    `g_mode`: see `generator_mode` ("train" normalises over batches of `batch_size`, as the paper's official
    code sampled in batches of 100); evaluating never changes the model. `ema` only labels the record
    (whether `generator` is the EMA copy)."""
    with generator_mode(generator, g_mode):
        device = next(generator.parameters()).device
        gen = generator_stats(sample_fn(generator, z_dim), num_samples, batch_size, network=net, device=device,
                              seed=seed, keep_features=kid, progress=progress)
    ref = reference if kid or reference.features is None else \
        FeatureStats(reference.mu, reference.sigma, reference.n, reference.meta)
    result = compare_on_rank0(gen, ref)
    m = reference.meta
    result.update(g_mode=g_mode, g_batch_size=batch_size, ema=ema, data_resolution=m.get("image_resolution"),
                  stored_resolution=m.get("stored_resolution"), image_format=m.get("image_format"),
                  reference_dataset_sha256=m.get("dataset_sha256"))
    return result


# What a FID/KID value is comparable under: logged with every value (MLflow tags, metrics.jsonl, the
# per-evaluation JSON, `rgan eval`'s output). `resolution` is the network's input size (299),
# `data_resolution` the size the reals were decoded at (model.resolution), `stored_resolution` and
# `image_format` how the shards hold them.
PROTOCOL_KEYS = ("n_a", "n_b", "network_sha256", "network_source", "resize", "resolution", "g_mode",
                 "g_batch_size", "ema", "data_resolution", "stored_resolution", "image_format",
                 "reference_dataset_sha256")


def protocol(result: dict[str, Any]) -> dict[str, str]:
    """The protocol of one FID record as `fid.<key>` strings (MLflow tags; metrics.jsonl's `protocol`)."""
    names = {"n_a": "num_samples", "n_b": "reference_samples", "resolution": "network_resolution"}
    return {f"fid.{names.get(k, k)}": str(result.get(k)) for k in PROTOCOL_KEYS}


def describe(result: dict[str, Any]) -> str:
    """One line a reader can compare with a paper: the value, N on both sides, network and resize."""
    kid = f" KID {result['kid']:.5f}{kid_spread(result, 5)}" if result.get("kid") is not None else ""
    fix = " (covariance eps fix-up applied)" if result.get("fid_fixup") else ""
    ema = {True: "EMA ", False: "", None: ""}[result.get("ema")]
    return (f"FID {result['fid']:.4f}{fix}{kid}; N={result['n_a']} generated vs {result['n_b']} real; "
            f"network {result['network_source']} sha256 {str(result['network_sha256'])[:16]}...; "
            f"resize {result['resize']} to {result['resolution']}px; {ema}G in {result.get('g_mode', 'eval')} mode; "
            f"reals at {result.get('data_resolution')}px from {result.get('image_format')}")


# ----------------------------------------------------------------------------------- in training


class FidEvaluator:
    """`evaluator(step, generator)` -> {"fid", "kid", "kid_std", "eval_seconds"}, the same on every rank.

    The network is resolved when the evaluator is built (a missing network fails before training
    starts) and loaded, with the reference statistics, at the first evaluation."""

    def __init__(self, cfg: Config, *, tracker: Tracker | None = None, inception: str | None = None,
                 device: torch.device | str = "cpu", progress: bool = True) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.inception_path = inception
        self.device = torch.device(device)
        self.progress = progress
        resolve_inception(inception)
        self.net: InceptionNetwork | None = None
        self.reference: FeatureStats | None = None
        self._ready = False
        self.records_dir = cfg.out_dir / "fid"
        self.history: list[dict[str, Any]] = []
        self.protocol: dict[str, str] | None = None  # of the last value: logged beside it (loop.evaluate)

    @property
    def num_reference(self) -> int:
        return self.cfg.eval.reference_samples or self.cfg.eval.num_samples

    @property
    def reference_data(self) -> str:
        """The images FID compares with: the training data unless `eval.reference_data` names others."""
        return self.cfg.eval.reference_data or self.cfg.data.shards

    def _setup(self) -> None:
        """Load what is still missing (network, reference statistics), then announce them once: printed
        with their provenance and set as MLflow tags, so every FID of the run says how it was computed."""
        t0 = time.perf_counter()
        e, m = self.cfg.eval, self.cfg.model
        if self.net is None:
            self.net = load_inception(self.inception_path, device=self.device)
        if self.reference is None:
            self.reference = reference_stats(self.reference_data, self.net, resolution=m.resolution,
                                             num_samples=self.num_reference, batch_size=e.batch_size,
                                             keep_features=e.kid, progress=self.progress)
        self._ready = True
        if rank_world()[0] != 0:
            return
        cache = self.reference.meta.get("cache")
        print(f"rgan: FID reference: {self.reference.n} real images of {self.reference_data} "
              f"({cache or 'not cached'}; {time.perf_counter() - t0:.1f}s); {self.net.info.summary()}", flush=True)
        if self.tracker is not None:
            i = self.net.info
            self.tracker.set_tags({
                "fid.network_source": i.source, "fid.network_path": i.path, "fid.network_sha256": i.sha256,
                "fid.resize": i.resize, "fid.resolution": i.resolution, "fid.num_samples": e.num_samples,
                "fid.reference_samples": self.reference.n, "fid.reference_data": self.reference_data,
                "fid.batch_size": e.batch_size})
            if self.cfg.tracking.log_fid_stats and cache and Path(cache).is_file():
                self.tracker.log_artifact(cache, "fid")

    def __call__(self, step: int, generator: torch.nn.Module) -> dict[str, float]:
        if not self._ready:
            self._setup()
        assert self.net is not None and self.reference is not None
        t0 = time.perf_counter()
        e = self.cfg.eval
        result = evaluate_generator(generator, self.net, self.reference, num_samples=e.num_samples,
                                    z_dim=self.cfg.model.z_dim, seed=self.cfg.train.seed + EVAL_SEED_OFFSET,
                                    batch_size=e.batch_size, kid=e.kid, progress=self.progress, g_mode=e.g_mode,
                                    ema=e.use_ema and self.cfg.train.ema > 0)
        seconds = time.perf_counter() - t0
        self.protocol = protocol(result)
        if rank_world()[0] == 0:
            self._record(step, result, seconds)
        metrics = {"fid": float(result["fid"]), "eval_seconds": seconds}
        if result.get("kid") is not None:
            metrics["kid"] = float(result["kid"])
            if result.get("kid_std") is not None:  # none where KID has no spread (fid.kid)
                metrics["kid_std"] = float(result["kid_std"])
        return metrics

    def _record(self, step: int, result: dict[str, Any], seconds: float) -> None:
        """Print the value with its provenance; keep it as JSON (logged to MLflow under fid/)."""
        print(f"rgan: step {step}: {describe(result)} [{seconds:.1f}s]", flush=True)
        info = result.get("fid_info") or {}
        record = {"step": step, "time": time.time(), "eval_seconds": seconds, "reference_data": self.reference_data,
                  **{k: v for k, v in result.items() if k != "fid_info"},
                  "fid_info": {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                               for k, v in info.items()}}
        self.history.append(record)
        self.records_dir.mkdir(parents=True, exist_ok=True)
        path = self.records_dir / f"step_{step:07d}.json"
        path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
        if self.tracker is not None:
            self.tracker.log_artifact(path, "fid")


def _jsonable(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else str(v)


# --------------------------------------------------------------------------------------------- modes


def generated_mode_counts(generator: torch.nn.Module, *, z_dim: int, num_samples: int, batch_size: int, seed: int,
                          resolution: int, g_mode: str = "eval") -> tuple[np.ndarray, Any]:
    """The Stacked-Digits mode histogram [1000] of `num_samples` generated images, the same on every rank.

    Latents follow `compute_generator_features`' scheme (global batch k drawn from `batch_seed(seed, k)`,
    batches split contiguously across ranks), so the value depends neither on the world size nor on which
    metrics run beside it. Each rank classifies its share on the CPU; the histograms are summed.
    Returns (counts, the classifier used)."""
    from rgan_dist.metrics.modes import load_classifier, mode_histogram

    classifier = load_classifier(resolution)
    rank, world = rank_world()
    lo, hi = share(math.ceil(num_samples / batch_size), rank, world)
    sample = sample_fn(generator, z_dim)
    device = next(generator.parameters()).device

    def batches() -> Iterator[np.ndarray]:
        for k in range(lo, hi):
            gen = torch.Generator(device=device).manual_seed(batch_seed(seed, k))
            with torch.no_grad():
                images = sample(min(batch_size, num_samples - k * batch_size), gen)
            if images.shape[1] != 3:
                raise UsageError(f"modes: the generator makes {images.shape[1]}-channel images; Stacked-Digits "
                                 "modes need 3 (model.channels=3)")
            yield images.permute(0, 2, 3, 1).cpu().numpy()

    with generator_mode(generator, g_mode):
        local, _ = mode_histogram(batches(), classifier=classifier)
    counts = gather_rows(torch.from_numpy(local)[None]).sum(0).numpy()
    return counts, classifier


class ModesEvaluator:
    """`evaluator(step, generator)` -> {"modes", "modes_kl", "modes_classifier_accuracy", "modes_seconds",
    "eval_seconds"}, the same on every rank: Stacked-Digits modes of `eval.modes_samples` generated images
    (`rgan_dist.metrics.modes`). Needs no Inception network and no reference statistics."""

    def __init__(self, cfg: Config, *, tracker: Tracker | None = None, device: torch.device | str = "cpu",
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.history: list[dict[str, Any]] = []
        self.protocol: dict[str, str] | None = None

    def __call__(self, step: int, generator: torch.nn.Module) -> dict[str, float]:
        from rgan_dist.metrics.modes import summarize

        t0 = time.perf_counter()
        e = self.cfg.eval
        counts, clf = generated_mode_counts(generator, z_dim=self.cfg.model.z_dim, num_samples=e.modes_samples,
                                            batch_size=e.batch_size, seed=self.cfg.train.seed + EVAL_SEED_OFFSET,
                                            resolution=self.cfg.model.resolution, g_mode=e.g_mode)
        seconds = time.perf_counter() - t0
        metrics = {**summarize(counts), "modes_classifier_accuracy": clf.held_out_accuracy,
                   "modes_seconds": seconds, "eval_seconds": seconds}
        self.protocol = {"modes.num_samples": str(int(counts.sum())), "modes.resolution": str(clf.resolution),
                         "modes.classifier": json.dumps(clf.key, sort_keys=True),
                         "modes.classifier_held_out": str(clf.held_out_count), "modes.g_mode": e.g_mode,
                         "modes.ema": str(e.use_ema and self.cfg.train.ema > 0)}
        if rank_world()[0] == 0:
            self.history.append({"step": step, **metrics})
            print(f"rgan: step {step}: modes {int(metrics['modes'])}/1000, KL {metrics['modes_kl']:.4f}; "
                  f"N={int(counts.sum())}, digit classifier held-out accuracy {clf.held_out_accuracy:.4f} "
                  f"[{seconds:.1f}s]", flush=True)
        return metrics


class EvaluatorSuite:
    """Several evaluators run as one: their dicts merged, `eval_seconds` the total, protocols joined."""

    def __init__(self, evaluators: list[Any]) -> None:
        self.evaluators = evaluators
        self.protocol: dict[str, str] | None = None

    @property
    def tracker(self) -> Tracker | None:
        return self.evaluators[0].tracker

    @tracker.setter
    def tracker(self, value: Tracker | None) -> None:
        for ev in self.evaluators:
            ev.tracker = value

    def __call__(self, step: int, generator: torch.nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        protocol: dict[str, str] = {}
        total = 0.0
        for ev in self.evaluators:
            result = ev(step, generator)
            total += result.get("eval_seconds", 0.0)
            out.update(result)
            protocol.update(getattr(ev, "protocol", None) or {})
        out["eval_seconds"] = total
        self.protocol = protocol or None
        return out


# What computes each name `eval.metrics` may list (config.EVAL_METRICS mirrors the keys; a test checks):
# metrics that share an evaluator (fid and kid: one Inception pass) are computed by one instance.
class Evaluator(Protocol):
    """What the loop calls every `eval.every` steps with the generator to judge; returns metrics such as
    fid/kid (`make_evaluator` builds the configured one; tests hand in their own)."""

    def __call__(self, step: int, generator: torch.nn.Module) -> dict[str, float]: ...


METRICS: dict[str, type] = {"fid": FidEvaluator, "kid": FidEvaluator, "modes": ModesEvaluator}


def make_evaluator(cfg: Config, strategy: Any, tracker: Tracker | None = None) -> Any:
    """The loop's evaluator for `eval.metrics`; None when `eval.every` is 0 (then no network is even looked
    for). Only the listed metrics' evaluators are built: `[modes]` alone loads no Inception network."""
    if not cfg.eval.every:
        return None
    unknown = [m for m in cfg.eval.metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"eval.metrics: unknown {unknown[0]!r}; choose from {', '.join(METRICS)}")
    kinds = list(dict.fromkeys(METRICS[m] for m in cfg.eval.metrics))
    progress = bool(cfg.train.progress) and strategy.is_main
    evaluators = []
    for kind in kinds:
        if kind is FidEvaluator:
            evaluators.append(FidEvaluator(cfg, tracker=tracker, inception=cfg.eval.inception or None,
                                           device=strategy.device, progress=progress))
        else:
            evaluators.append(kind(cfg, tracker=tracker, device=strategy.device, progress=progress))
    if not evaluators:
        return None
    return evaluators[0] if len(evaluators) == 1 else EvaluatorSuite(evaluators)
