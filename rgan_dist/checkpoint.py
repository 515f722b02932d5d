"""Checkpoint manager: the loop calls `save(step, state)` and `load(...)`; this file owns everything else.

Layout of `checkpoint.dir`:
  ckpt-00001000.pt ...   the last `keep` rolling checkpoints (models, EMA, optimizers, every rank's RNG
                         and data position, the resolved config)
  ckpt-00001000.ds/      DeepSpeed runs only: each rank's ZeRO optimizer partition, written by every rank
                         before rank 0 writes the .pt beside it; pruned together with it
  best.pt                the best-FID checkpoint, kept apart from the rolling ones
  <name>.sha256          beside each checkpoint (and best.pt): the sha256 of the file and of every file of
                         its .ds folder, in `sha256sum -c` format, written after them
  latest                 a text file naming the newest rolling checkpoint
  <name>.corrupt         a checkpoint whose bytes no longer match its digest, set aside by `--resume auto`

Every write goes to a temporary name, is fsynced, then renamed over the target, and the `latest`
pointer is updated the same way only after the checkpoint and its digest are durable: a job killed mid-write
leaves the previous checkpoint and pointer intact. Files hold only tensors and plain Python values,
so they load with `torch.load(weights_only=True)` (no arbitrary code runs when loading).

Why a digest: `torch.load` does not check the zip's CRCs, so flipped bytes (a bad disk, a copy gone wrong)
load as wrong weights without a word. Every load checks the digest first (`load_checkpoint`); a checkpoint
written before digests existed still loads, with one info line. A save defers SIGTERM/SIGINT until its files
are complete (`signals_deferred`), and checks the free space first (`CheckpointManager.save`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from rgan_dist.errors import UsageError

# `ckpt-{step:08d}`: eight digits at least, more past step 99,999,999. Names therefore do not sort like
# steps (ckpt-100000000 < ckpt-99999999 as text): order by the parsed step, never by name.
_ROLLING = re.compile(r"^ckpt-(\d{8,})\.pt$")
_SIDECAR = re.compile(r"^ckpt-(\d{8,})\.ds$")
_TEMP = re.compile(r"^\.ckpt-\d{8,}\.pt(\.sha256)?\.tmp-\d+$")
DIGEST = ".sha256"
CORRUPT = ".corrupt"
# Every file a checkpoint folder holds for a run: what `previous_run` moves aside with it.
_CHECKPOINT_FILE = re.compile(rf"^(latest|best\.pt|ckpt-\d{{8,}}\.(pt|ds))({re.escape(DIGEST)})?({re.escape(CORRUPT)}"
                              rf"(-\d+)?)?$")
_MB = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any, before_commit: Callable[[], None] | None = None) -> None:
    """Call `write(file_object)` on a temp file beside `path`, fsync it, and rename it into place.

    `before_commit` runs after `write` and before the flush/fsync/rename: the test hook that kills a
    process there shows that a half-written checkpoint never replaces a good one. The temp file is removed
    whatever fails (a full disk included)."""
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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block (a checkpoint save) is done, then deliver them to the handlers
    that were there before, so they are handled as usual (the loop's: stop, write the final checkpoint).

    Why: a handler that raises inside `torch.save`'s writer (the single-process SIGTERM handler, Ctrl-C)
    leaves a torn zip, a RuntimeError traceback and no final checkpoint. A second Ctrl-C during the block
    stops at once (the user insists; the atomic write keeps the previous checkpoint). Outside the main
    thread (a Ray worker thread) signals cannot be handled here and are left alone, as is a signal the process
    ignores."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def defer(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signum in pending:
            raise KeyboardInterrupt
        pending.append(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        # None: installed outside Python, cannot be put back. SIG_IGN: the process was started ignoring it
        # (a background job of a script gets SIGINT ignored): deferring it would make a second one stop the
        # run, where the user's setting says it does nothing.
        if signal.getsignal(sig) not in (None, signal.SIG_IGN):
            previous[sig] = signal.signal(sig, defer)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


# ---------------------------------------------------------------------------------------------- digests


def digest_path(path: Path) -> Path:
    """The digest file beside checkpoint `path`: `ckpt-00001000.pt.sha256`, `best.pt.sha256`."""
    return path.with_name(path.name + DIGEST)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _covered(path: Path) -> list[Path]:
    """The files a checkpoint consists of: the .pt and, for a DeepSpeed one, every file of its .ds folder."""
    ds = path.with_suffix(".ds")
    extra = sorted(p for p in ds.rglob("*") if p.is_file()) if _ROLLING.match(path.name) and ds.is_dir() else []
    return [path, *extra]


def write_digest(path: Path) -> None:
    """Write `<path>.sha256` (atomically, after the checkpoint's files are durable): one `sha256sum` line per
    file, named relative to the checkpoint folder, so `sha256sum -c ckpt-00001000.pt.sha256` checks it too."""
    lines = "".join(f"{_sha256(p)}  {p.relative_to(path.parent).as_posix()}\n" for p in _covered(path))
    atomic_write(digest_path(path), lambda f: f.write(lines.encode()))


def digest_problem(path: Path) -> str | None:
    """What is wrong with checkpoint `path` against its digest: None when every file matches; `UNVERIFIED`
    when it has no digest (written before digests existed); else a short reason."""
    listing = digest_path(path)
    if not listing.is_file():
        return UNVERIFIED
    for line in listing.read_text().splitlines():
        want, sep, name = line.partition("  ")
        if not sep:
            return f"damaged: its digest file {listing.name} is not in sha256sum format"
        f = path.parent / name
        if not f.is_file():
            return f"damaged: {name} is missing"
        got = _sha256(f)
        if got != want:
            return f"damaged: sha256 of {name} is {got[:12]}..., the digest written with it says {want[:12]}..."
    return None


UNVERIFIED = "no digest"
_told_unverified: set[Path] = set()


class CorruptCheckpoint(UsageError):
    """A checkpoint whose bytes do not match its digest, or that does not load (truncated, zeroed)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        good = newest_good(path.parent, exclude=path)
        hint = f"; the newest good checkpoint there is {good}" if good is not None else \
            f"; no good checkpoint is left in {path.parent}" if _CHECKPOINT_FILE.match(path.name) else ""
        super().__init__(f"checkpoint {str(path)!r}: {reason}{hint}")


def newest_good(directory: Path, exclude: Path | None = None) -> Path | None:
    """The newest rolling checkpoint in `directory` that matches its digest (one without a digest: that
    loads), other than `exclude`; nothing is moved. For the one line that names where to go instead."""
    for p in reversed(CheckpointManager(directory).rolling()):
        if exclude is not None and p.resolve() == exclude.resolve():
            continue
        problem = digest_problem(p)
        if problem is None:
            return p
        if problem == UNVERIFIED:
            with contextlib.suppress(Exception):
                torch.load(p, map_location="cpu", weights_only=True)
                return p
    return None


# ---------------------------------------------------------------------------------------------- space


class DiskFull(UsageError):
    """No room for the next checkpoint: one line, exit 2; the previous checkpoint is intact."""


def _size(path: Path) -> int:
    """Bytes of a checkpoint: its .pt, its .ds folder and its digest."""
    return sum(p.stat().st_size for p in [*_covered(path), digest_path(path)] if p.is_file())


def _state_bytes(obj: Any) -> int:
    """The tensor bytes in a state (the size of a first checkpoint, before one was written)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _orphan_digest(name: str, kept: set[str]) -> bool:
    """A rolling checkpoint's digest whose checkpoint is gone (pruned, or the kill came between the two)."""
    m = _ROLLING.match(name.removesuffix(DIGEST))
    return name.endswith(DIGEST) and m is not None and name.removesuffix(DIGEST).removesuffix(".pt") not in kept


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


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
        """Write `ckpt-<step>.pt`, its digest, then point `latest` at it, then prune. Only the caller that owns
        the folder (rank 0) calls this, after every rank finished writing the step's sidecar folder.

        SIGTERM/SIGINT wait until it is done (`signals_deferred`). A full disk is one line (`DiskFull`), the
        temp file removed and the previous checkpoint intact; `make_room` ran first."""
        path = self.dir / f"ckpt-{step:08d}.pt"
        with signals_deferred():
            self.make_room(step, state, best=best)
            written = False
            try:
                atomic_write(path, lambda f: torch.save(state, f), before_commit)
                written = True
                write_digest(path)
                atomic_write(self.dir / "latest", lambda f: f.write(path.name.encode()))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if written and digest_problem(path) is not None:  # written, but its digest was not
                    path.unlink()
                    digest_path(path).unlink(missing_ok=True)
                raise self._disk_full(path, self._need(step, state, best=best)) from None
            if best:
                self._write_best(state)
            self._prune()
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        with signals_deferred():
            return self._write_best(state)

    def _write_best(self, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "best.pt"
        try:
            atomic_write(path, lambda f: torch.save(state, f))
            write_digest(path)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise self._disk_full(path, _state_bytes(state)) from None
        return path

    # ---- space: checked before writing, pruned first when that makes room --------------------------------

    def _need(self, step: int, state: dict[str, Any] | None, *, best: bool) -> int:
        """Bytes the save of `step` still needs: the last checkpoint's size (its .pt once more for best.pt), or
        the tensors' size for a first one. Less the .ds part when the ranks have already written this step's."""
        files = [p for p in self.rolling() if p != self.dir / f"ckpt-{step:08d}.pt"]
        if not files:
            return _state_bytes(state) * (2 if best else 1) if state is not None else 0
        pt = files[-1].stat().st_size
        return (pt if self.sidecar(step).is_dir() else _size(files[-1])) + (pt if best else 0)

    def make_room(self, step: int, state: dict[str, Any] | None = None, *, best: bool = False) -> None:
        """Before writing checkpoint `step`: if the free space is short of what the last checkpoint took, prune
        now the old checkpoints this save would prune anyway (never the newest one), when that makes room;
        else raise `DiskFull` with nothing removed. DeepSpeed runs call it before the ranks write the .ds."""
        self.dir.mkdir(parents=True, exist_ok=True)
        need = self._need(step, state, best=best)
        usage = shutil.disk_usage(self.dir)
        free = usage.free
        if free >= need or usage.total == 0:  # total 0: a file system that does not say (some FUSE mounts)
            return
        files = [p for p in self.rolling() if p.name != f"ckpt-{step:08d}.pt"]
        doomed = files[: max(0, min(len(files) - self.keep + 1, len(files) - 1))]
        if free + sum(_size(p) for p in doomed) < need:
            raise self._disk_full(self.dir / f"ckpt-{step:08d}.pt", need, free)
        for p in doomed:
            self._remove(p)
        print(f"rgan: pruned {', '.join(p.name for p in doomed)} before saving ckpt-{step:08d} to make room "
              f"({free / _MB:.0f} MB were free, ~{need / _MB:.0f} MB needed)", flush=True)

    def _disk_full(self, path: Path, need: int, free: int | None = None) -> DiskFull:
        free = shutil.disk_usage(self.dir).free if free is None else free
        kept = [p for p in self.rolling() if p != path]
        intact = f"previous checkpoint {kept[-1].stem} is intact" if kept else "there is no previous checkpoint"
        return DiskFull(f"no space left on {_mount_point(self.dir)} while saving {path.stem} (needs ~{need / _MB:.0f} "
                        f"MB, {free / _MB:.0f} MB free); {intact}")

    def _remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        digest_path(path).unlink(missing_ok=True)
        shutil.rmtree(path.with_suffix(".ds"), ignore_errors=True)

    def _prune(self) -> None:
        """Keep the last `keep` checkpoints (with their digests); drop sidecars and digests whose .pt is gone
        or was never written (a job killed mid-save) and temp files left by killed writers."""
        for old in self.rolling()[: -self.keep]:
            self._remove(old)
        kept = {p.stem for p in self.rolling()}
        for p in self.dir.iterdir():
            if _SIDECAR.match(p.name) and p.stem not in kept:
                shutil.rmtree(p, ignore_errors=True)
            elif _orphan_digest(p.name, kept) or _TEMP.match(p.name) and not p.name.endswith(f".tmp-{os.getpid()}"):
                p.unlink(missing_ok=True)

    # ---- resume: the newest checkpoint that matches its digest ------------------------------------------

    def set_aside_corrupt(self, path: Path) -> Path:
        """Rename a damaged checkpoint (with its digest and .ds folder) to `<name>.corrupt`: kept for a look,
        out of the rolling set. Returns the new name of the file."""
        n = 0
        suffix = CORRUPT
        while path.with_name(path.name + suffix).exists():
            n += 1
            suffix = f"{CORRUPT}-{n}"
        for p in (path, digest_path(path), path.with_suffix(".ds")):
            if p.exists() and path.parent == self.dir:
                p.rename(p.with_name(p.name + suffix))
        return path.with_name(path.name + suffix)

    def open_resume(self, resume: str) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint `resume` names, verified and loaded: `''` -> None; `auto` -> the newest good one
        in the folder (None if there is none), each damaged newer one set aside with one warning line; a file
        -> that file, or `CorruptCheckpoint` (one line naming the newest good one); a folder -> its latest."""
        if not resume:
            return None
        if resume != "auto":
            path = checkpoint_path(resume, what="checkpoint.resume", allowed="a path, a folder, or 'auto'")
            return path, load_checkpoint(path)
        candidates = list(dict.fromkeys([p for p in [self.latest()] if p is not None] + self.rolling()[::-1]))
        bad: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                state = load_checkpoint(path)
            except CorruptCheckpoint as e:
                bad.append((path, e.reason))
                continue
            self._tell_set_aside(bad, f"resuming from {path.name}")
            return path, state
        if bad:
            self._tell_set_aside(bad, "no good checkpoint is left")
            raise UsageError(f"checkpoint.resume=auto: every checkpoint in {self.dir} is damaged (set aside as "
                             f"*{CORRUPT}); start afresh with --overwrite, or give --resume PATH")
        return None

    def _tell_set_aside(self, bad: list[tuple[Path, str]], then: str) -> None:
        for path, reason in bad:
            kept = self.set_aside_corrupt(path)
            print(f"rgan: warning: checkpoint {path}: {reason}; kept as {kept.name}, {then}",
                  file=sys.stderr, flush=True)


# What a run writes into run.out_dir besides its checkpoints: the metrics record (tracking.py), sample grids
# (samples), per-evaluation FID records (metrics/evaluator.py), the final generator it logged to MLflow
# (rgan_dist.mlflow_model), and the files its MLflow tracker writes.
METRICS = "metrics.jsonl"
DISCARDED = METRICS + ".discarded"
RUN_FILES = (METRICS, DISCARDED, "samples", "fid", "generator")
# mlflow_*.jsonl: records the run's tracker could not send yet (rgan_dist.tracking_spool); they move with their run
TRACKER_FILES = ("config.yaml", "mlflow_run.json", "mlflow_spool.jsonl", "mlflow_spool.jsonl.discarded",
                 "mlflow_rejected.jsonl")
PREVIOUS = "previous"


def discard_metrics_after(out_dir: Path, step: int) -> int:
    """On resume from the checkpoint of `step`: move the records of `metrics.jsonl` past `step` (logged by the
    attempt that died after that checkpoint; the resumed run logs those steps again) to
    `metrics.jsonl.discarded`, appended, so each step appears once and nothing is deleted. A line torn by the
    kill goes there too. Returns how many records moved."""
    path = out_dir / METRICS
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        (keep if ok else drop).append(line + "\n")
    if not drop:
        return 0
    with open(out_dir / DISCARDED, "a") as f:
        f.writelines(drop)
        f.flush()
        os.fsync(f.fileno())
    atomic_write(path, lambda f: f.write("".join(keep).encode()))
    print(f"rgan: moved {len(drop)} record(s) past step {step} from {path} (the interrupted attempt's) to "
          f"{DISCARDED}", flush=True)
    return len(drop)


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
    return bool(_CHECKPOINT_FILE.match(name))


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, verify: bool = True
                    ) -> dict[str, Any]:
    """Load a checkpoint after checking it against its digest (`verify`; ranks that load what rank 0 verified
    skip it). A mismatch, or a file that does not load, is `CorruptCheckpoint`: one line naming the newest
    good checkpoint beside it. A checkpoint without a digest (written before they existed) loads, with one
    info line per file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r}: no such file")
    problem = digest_problem(path) if verify else None
    if problem not in (None, UNVERIFIED):
        raise CorruptCheckpoint(path, problem)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated, zeroed or foreign file: say which, never a traceback
        raise CorruptCheckpoint(path, f"not a loadable rgan-dist checkpoint ({e.__class__.__name__}: truncated, "
                                      "damaged or another kind of file)") from None
    if problem == UNVERIFIED and path.resolve() not in _told_unverified:
        _told_unverified.add(path.resolve())
        print(f"rgan: {path} has no {DIGEST} digest (written before rgan-dist wrote them, or its job was "
              f"killed between the two): loaded it unverified", file=sys.stderr, flush=True)
    return state
