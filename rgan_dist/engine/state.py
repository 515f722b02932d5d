"""A run's checkpoint state, outside the loop: what a checkpoint holds (`state_dict`), each rank's RNG
streams, the rank fingerprints that catch diverged ranks, the collective save, the run-folder claim and the
resume resolution. `rgan_dist.checkpoint` stores files (atomic writes, keep-K, `latest`, best.pt) and knows
nothing of ranks; this module is the engine's use of it, collectives included (every function that takes
the strategy's collectives is called by every rank at the same point).

Exact resume is the contract: model, optimizers, EMA, step and counters, and every rank's RNG streams
(torch, CUDA, the per-rank noise generator, Python, NumPy) and data position come back bit for bit.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from rgan_dist.checkpoint import (
    PREVIOUS,
    TRACKER_FILES,
    CheckpointManager,
    DiskFull,
    discard_metrics_after,
    load_checkpoint,
    previous_run,
    set_aside,
)
from rgan_dist.config import Config, dump_config
from rgan_dist.config_diff import check_resume_config
from rgan_dist.errors import UsageError
from rgan_dist.tracking_spool import discard_after

if TYPE_CHECKING:
    from rgan_dist.augment import Augment
    from rgan_dist.ema import EMA
    from rgan_dist.engine.strategy import Strategy


class Trainer(Protocol):
    """What a checkpoint saves and resumes of a run: the parts of `engine.loop.Trainer` this module reads
    and sets, named here so that it needs no import of the loop above it."""

    cfg: Config
    strategy: Strategy
    ckpt: CheckpointManager
    ema: EMA | None
    augment: Augment | None
    gen: torch.Generator
    data: Any  # rgan_dist.data.BatchIterator (its `state()`), not built yet while resuming
    step: int
    bad_steps_total: int
    best_fid: float

    def buffered_modules(self) -> list[torch.nn.Module]: ...


def state_dict(trainer: Trainer) -> dict[str, Any]:
    """This rank's view of the run. Not a collective (best.pt calls it on rank 0 alone); the
    per-rank parts of every rank are gathered by `save_checkpoint`."""
    return {
        "format": "rgan-dist/1",
        "step": trainer.step,
        "config": dump_config(trainer.cfg),
        "model": trainer.strategy.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "augment": trainer.augment.state_dict() if trainer.augment is not None else None,
        "rng": rng_state(trainer),
        "data": trainer.data.state(),
        "world_size": trainer.strategy.world_size,
        "bad_steps": trainer.bad_steps_total,
        "best_fid": trainer.best_fid,
    }

def rng_state(trainer: Trainer) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "gen": trainer.gen.get_state(),
            "cuda": torch.cuda.get_rng_state() if trainer.strategy.device.type == "cuda" else None,
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            # ADA's window of this rank's D statistics (rgan_dist.augment): per rank, like the streams
            "augment_window": trainer.augment.window.cpu() if trainer.augment is not None else None}

def set_rng_state(trainer: Trainer, rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    trainer.gen.set_state(rng["gen"])
    if rng.get("cuda") is not None and trainer.strategy.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    if rng.get("python") is not None:
        random.setstate(rng["python"])
    if rng.get("numpy") is not None:
        name, key, *rest = rng["numpy"]
        np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    if rng.get("augment_window") is not None and trainer.augment is not None:
        trainer.augment.window.copy_(rng["augment_window"])

def fingerprints(trainer: Trainer) -> dict[str, str]:
    """Hashes of this rank's G, D and EMA parameters and buffers: equal on every rank, or the ranks
    diverged. BatchNorm's running statistics are left out: they are per rank by design until
    `sync_buffers`, which runs after this (it would hide a divergence of the other buffers, e.g.
    spectral norm's u/v, which must agree at every step)."""
    modules = {"G": trainer.strategy.G, "D": trainer.strategy.D}
    if trainer.ema is not None:
        modules["EMA"] = trainer.ema.module
    out = {}
    for name, module in modules.items():
        h = hashlib.sha256()
        buffers = [b for sub in module.modules() if not isinstance(sub, torch.nn.modules.batchnorm._BatchNorm)
                   for b in sub.buffers(recurse=False)]
        for t in [*module.parameters(), *buffers]:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out

def save_checkpoint(trainer: Trainer) -> Path | None:
    """Collective: every rank calls it at the same step. Rank 0 writes one file holding every rank's
    RNG state and data position; sharded strategies first write their parts into the step's folder."""
    s = trainer.strategy
    fingerprint = fingerprints(trainer)
    s.sync_buffers(trainer.buffered_modules())
    state = state_dict(trainer)
    ranks = s.all_gather_object({"rng": state["rng"], "data": state["data"], "fingerprint": fingerprint})
    sidecar = trainer.ckpt.sidecar(trainer.step)
    if s.is_main and sidecar.exists():  # left by a job killed while saving this very step
        shutil.rmtree(sidecar)
    _on_main(s, lambda: trainer.ckpt.make_room(trainer.step, state))  # before any rank writes (also a barrier)
    if s.save_sharded(sidecar):
        state["sharded"] = sidecar.name
    s.barrier()  # every rank's part is on disk before the file that makes the checkpoint count

    def write() -> Path:
        if any(r["fingerprint"] != ranks[0]["fingerprint"] for r in ranks):
            raise RuntimeError(f"ranks diverged at step {trainer.step}: parameter/buffer hashes differ "
                               f"({[r['fingerprint'] for r in ranks]}); not writing a checkpoint")
        state["ranks"] = ranks
        return trainer.ckpt.save(trainer.step, state, before_commit=lambda: s.fault_point("save", trainer.step))

    return _on_main(s, write)


def _on_main(s: Any, fn: Any) -> Any:
    """`fn()` on rank 0, then a sync point: a full disk there (`DiskFull`) is raised on every rank, so no
    rank is left waiting in a barrier. Returns rank 0's result there, None on the other ranks."""
    result, error = None, None
    if s.is_main:
        try:
            result = fn()
        except DiskFull as e:
            error = str(e)
    error = s.broadcast_object(error)
    if error is not None:
        raise DiskFull(error)
    return result

def claim_run_folder(trainer: Trainer, tracker_given: bool) -> None:
    """A run folder belongs to one run: a fresh run (checkpoint.resume '') never writes beside another
    run's checkpoints or into its metrics.jsonl. It refuses, or with checkpoint.overwrite moves the old
    files aside (`set_aside`; never deleted). Collective, like `resolve_resume`: what any rank sees
    decides for all, so every rank raises or none does; rank 0 alone moves, then a barrier. A tracker
    the caller made (the sweep's) has already written this run's config.yaml/mlflow_run.json: kept."""
    cfg = trainer.cfg
    if cfg.checkpoint.resume:
        return
    mine = [str(p) for p in previous_run(cfg.out_dir, cfg.checkpoint_dir)]
    old = sorted({p for seen in trainer.strategy.all_gather_object(mine) for p in seen})
    if not old:
        return
    if not cfg.checkpoint.overwrite:
        latest = trainer.ckpt.latest()
        what = f"checkpoints up to {latest.name}" if latest is not None else ", ".join(Path(p).name for p in old)
        raise UsageError(f"{cfg.checkpoint_dir if latest is not None else cfg.out_dir} already holds another run "
                         f"({what}): continue it with --resume auto, move it aside with --overwrite "
                         f"(checkpoint.overwrite=true; kept in {cfg.out_dir / PREVIOUS}/), or give this run its "
                         f"own folder: run.name={cfg.run.name}-{{variant}} (one per loss variant) or run.out_dir=DIR")
    if trainer.strategy.is_main:
        moved = set_aside([Path(p) for p in old if Path(p).exists()], cfg.out_dir, cfg.checkpoint_dir,
                          keep=TRACKER_FILES if tracker_given else ())
        print(f"rgan: moved the previous run's files in this folder to {' and '.join(map(str, moved))}",
              flush=True)
    trainer.strategy.barrier()

def resolve_resume(trainer: Trainer) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume and its state, the same on every rank (or one clear error on every rank).
    Rank 0 verifies it against its digest and sets damaged ones aside (`CheckpointManager.open_resume`); the
    other ranks load the file it chose and check that they see one where it does (shared storage)."""
    s, resume_from = trainer.strategy, trainer.cfg.checkpoint.resume
    opened, found = None, None
    if s.is_main:
        try:
            opened = trainer.ckpt.open_resume(resume_from)
            found = str(opened[0]) if opened is not None else None
        except UsageError as e:
            found = f"error: {e}"
    found = s.broadcast_object(found)
    if found is not None and found.startswith("error: "):
        raise UsageError(found[len("error: "):])
    sees = Path(found).is_file() if found is not None else not (resume_from == "auto" and trainer.ckpt.latest())
    if not all(s.all_gather_object(sees)):
        raise UsageError(f"checkpoint.resume={resume_from!r}: ranks found different checkpoints (rank 0: {found}); "
                         f"checkpoint.dir must be storage every node shares")
    if found is None:
        return None
    return opened if opened is not None else (Path(found), load_checkpoint(found, verify=False))


def resume(trainer: Trainer) -> dict[str, Any] | None:
    opened = resolve_resume(trainer)
    if opened is None:
        return None
    path, state = opened
    if state.get("format") != "rgan-dist/1":
        raise UsageError(f"checkpoint {str(path)!r}: not an rgan-dist training checkpoint")
    changed = check_resume_config(state.get("config"), trainer.cfg, old_world_size=state.get("world_size"),
                                  world_size=trainer.strategy.world_size, where=str(path))
    if changed and trainer.strategy.is_main:
        print(changed, flush=True)
    sharded = path.parent / state["sharded"] if state.get("sharded") else None
    try:
        trainer.strategy.load_state_dict(state["model"], sharded=sharded)
    except RuntimeError as e:  # e.g. an allowed model.* change the weights cannot follow: one line, not 50
        said = " ".join(str(e).split())[:300]
        raise UsageError(f"checkpoint {str(path)!r} does not fit this model ({said}); resume with the model "
                         "config it was written with") from None
    if trainer.ema is not None and state["ema"] is not None:
        trainer.ema.load_state_dict(state["ema"])
    if trainer.augment is not None and state.get("augment") is not None:  # p and its stream; windows: per rank
        trainer.augment.load_state_dict(state["augment"])
    trainer.step = int(state["step"])
    trainer.bad_steps_total = int(state["bad_steps"])
    trainer.best_fid = float(state["best_fid"])
    ranks = state.get("ranks") or [{"rng": state["rng"], "data": state["data"]}]
    if len(ranks) == trainer.strategy.world_size:
        mine = ranks[trainer.strategy.rank]
    else:
        # The RNG and data split depend on the world size: the models and optimizers resume exactly,
        # the noise and data order continue from a fresh per-rank seed instead.
        if trainer.strategy.is_main:
            print(f"rgan: warning: {path} was written by {len(ranks)} rank(s), this job has "
                  f"{trainer.strategy.world_size}: resuming weights and optimizers; noise and data order restart "
                  f"from seed+step", flush=True)
        trainer.gen.manual_seed(trainer.cfg.train.seed * 7919 + trainer.strategy.rank + 104_729 * trainer.step)
        mine = {"rng": None, "data": {"epoch": ranks[0]["data"].get("epoch", 0) + 1, "batch": 0}}
    if mine["rng"] is not None:
        set_rng_state(trainer, mine["rng"])
    if trainer.strategy.is_main:
        print(f"rgan: resumed from {path} at step {trainer.step}", flush=True)
        discard_metrics_after(trainer.cfg.out_dir, trainer.step)  # each step once in metrics.jsonl
        discard_after(trainer.cfg.out_dir, trainer.step)  # ... and in MLflow, for records still in the spool
    return mine["data"]
