"""Checkpoint manager: the loop calls `save(step, state)` and `load(...)`; this file owns everything else.

Layout of `checkpoint.dir`:
  ckpt-00001000.pt ...   the last `keep` rolling checkpoints (models, EMA, optimizers, every rank's RNG
                         and data position, the resolved config)
  ckpt-00001000.ds/      DeepSpeed runs only: each rank's ZeRO optimizer partition, written by every rank
                         before rank 0 writes the .pt beside it; pruned together with it
  best.pt                the best-FID checkpoint, kept apart from the rolling ones
  latest                 a text file naming the newest rolling checkpoint

Every write goes to a temporary name, is fsynced, then renamed over the target, and the `latest`
pointer is updated the same way only after the checkpoint itself is durable: a job killed mid-write
leaves the previous checkpoint and pointer intact. Files hold only tensors and plain Python values,
so they load with `torch.load(weights_only=True)` (no arbitrary code runs when loading).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rgan_dist.errors import UsageError

# `ckpt-{step:08d}`: eight digits at least, more past step 99,999,999. Names therefore do not sort like
# steps (ckpt-100000000 < ckpt-99999999 as text): order by the parsed step, never by name.
_ROLLING = re.compile(r"^ckpt-(\d{8,})\.pt$")
_SIDECAR = re.compile(r"^ckpt-(\d{8,})\.ds$")
_TEMP = re.compile(r"^\.ckpt-\d{8,}\.pt\.tmp-\d+$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any, before_commit: Callable[[], None] | None = None) -> None:
    """Call `write(file_object)` on a temp file beside `path`, fsync it, and rename it into place.

    `before_commit` runs after `write` and before the flush/fsync/rename: the test hook that kills a
    process there shows that a half-written checkpoint never replaces a good one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if before_commit is not None:
                before_commit()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.dir = Path(directory)
        self.keep = keep

    def rolling(self) -> list[Path]:
        """The rolling checkpoints, oldest step first."""
        if not self.dir.is_dir():
            return []
        found = ((m, p) for p in self.dir.iterdir() if (m := _ROLLING.match(p.name)))
        return [p for m, p in sorted(found, key=lambda mp: int(mp[0].group(1)))]

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; falls back to the newest rolling file if the pointer is gone."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            target = self.dir / pointer.read_text().strip()
            if target.is_file():
                return target
        files = self.rolling()
        return files[-1] if files else None

    def sidecar(self, step: int) -> Path:
        """The folder beside `ckpt-<step>.pt` for state every rank writes a part of (DeepSpeed ZeRO)."""
        return self.dir / f"ckpt-{step:08d}.ds"

    @staticmethod
    def sidecar_of(path: Path) -> Path:
        return path.with_suffix(".ds")

    def save(self, step: int, state: dict[str, Any], *, best: bool = False,
             before_commit: Callable[[], None] | None = None) -> Path:
        """Write `ckpt-<step>.pt`, then point `latest` at it, then prune. Only the caller that owns the
        folder (rank 0) calls this, after every rank finished writing the step's sidecar folder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"ckpt-{step:08d}.pt"
        atomic_write(path, lambda f: torch.save(state, f), before_commit)
        atomic_write(self.dir / "latest", lambda f: f.write(path.name.encode()))
        if best:
            atomic_write(self.dir / "best.pt", lambda f: torch.save(state, f))
        self._prune()
        return path

    def _prune(self) -> None:
        """Keep the last `keep` checkpoints; drop sidecars whose .pt is gone or was never written (a job
        killed mid-save) and temp files left by killed writers."""
        for old in self.rolling()[: -self.keep]:
            old.unlink(missing_ok=True)
        kept = {p.stem for p in self.rolling()}
        for p in self.dir.iterdir():
            if _SIDECAR.match(p.name) and p.stem not in kept:
                shutil.rmtree(p, ignore_errors=True)
            elif _TEMP.match(p.name) and not p.name.endswith(f".tmp-{os.getpid()}"):
                p.unlink(missing_ok=True)

    def save_best(self, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "best.pt"
        atomic_write(path, lambda f: torch.save(state, f))
        return path

    def resolve(self, resume: str) -> Path | None:
        """`''` -> None; `auto` -> latest in the dir or None; anything else must be an existing file
        (or a checkpoint dir holding one)."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        return checkpoint_path(resume, what="checkpoint.resume", allowed="a path, a folder, or 'auto'")


# What a run writes into run.out_dir besides its checkpoints: the metrics record (tracking.py), sample grids
# (samples), per-evaluation FID records (metrics/evaluator.py), the final generator it logged to MLflow
# (rgan_dist.mlflow_model), and the files its MLflow tracker writes.
RUN_FILES = ("metrics.jsonl", "samples", "fid", "generator")
TRACKER_FILES = ("config.yaml", "mlflow_run.json")
PREVIOUS = "previous"


def previous_run(out_dir: Path, checkpoint_dir: Path) -> list[Path]:
    """The files an earlier run left where a fresh run would write (its checkpoints, `latest`, `best.pt`,
    metrics, samples, FID records): empty when there was none. A folder holding only tracker files is not
    a run (nothing would mix); they are listed (and moved) only beside a run's checkpoints or metrics."""
    ckpt = sorted(p for p in checkpoint_dir.iterdir() if _is_checkpoint_file(p.name)) if checkpoint_dir.is_dir() else []
    run = [out_dir / n for n in RUN_FILES if (out_dir / n).exists()] if out_dir.is_dir() else []
    if not ckpt and not run:
        return []
    return ckpt + run + [out_dir / n for n in TRACKER_FILES if (out_dir / n).exists()]


def _is_checkpoint_file(name: str) -> bool:
    return name in ("latest", "best.pt") or bool(_ROLLING.match(name) or _SIDECAR.match(name))


def set_aside(files: list[Path], out_dir: Path, checkpoint_dir: Path, *, keep: tuple[str, ...] = ()) -> list[Path]:
    """Move an earlier run's `files` (from `previous_run`) into `<out_dir>/previous/<time>/`, checkpoints into
    its `checkpoints/` (or, when checkpoint.dir lies outside the run folder, into
    `<checkpoint.dir>/previous/<time>/`, so large files never cross file systems). Nothing is deleted.
    Names in `keep` stay in place: files the new run's own tracker has already written. Returns the (one
    or two) folders that received files."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out_dir / PREVIOUS / stamp
    n = 1
    while dest.exists() or (checkpoint_dir / PREVIOUS / dest.name).exists():  # two runs in one second
        dest, n = out_dir / PREVIOUS / f"{stamp}-{n}", n + 1
    inside = checkpoint_dir.resolve().is_relative_to(out_dir.resolve())
    ckpt_dest = dest / "checkpoints" if inside else checkpoint_dir / PREVIOUS / dest.name
    used: list[Path] = []
    for f in files:
        if f.name in keep and f.parent == out_dir:
            continue
        folder = ckpt_dest if f.parent == checkpoint_dir and _is_checkpoint_file(f.name) else dest
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(f, folder / f.name)
        top = dest if folder.is_relative_to(dest) else folder
        if top not in used:
            used.append(top)
    return sorted(used, key=lambda f: f != dest)  # the run folder's first


def checkpoint_path(given: str, *, what: str, allowed: str = "a file such as best.pt, or a folder") -> Path:
    """A checkpoint file as given, or the newest one (`latest`) of a checkpoint folder; else one clear line."""
    path = Path(given).expanduser()
    if path.is_dir():
        found = CheckpointManager(path).latest()
        if found is None:
            raise UsageError(f"{what}={given!r}: folder holds no ckpt-*.pt checkpoint; give {allowed}")
        return found
    if not path.is_file():
        raise UsageError(f"{what}={given!r}: no such file; give {allowed}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {str(path)!r}: no such file") from None
    except Exception as e:  # a truncated or foreign file: say which, never a traceback
        raise UsageError(f"checkpoint {str(path)!r}: not a loadable rgan-dist checkpoint ({e.__class__.__name__})")\
            from None
