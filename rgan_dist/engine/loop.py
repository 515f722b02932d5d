"""The G/D training loop, written once above the strategy seam (`strategy.py`).

One outer step = `n_dis` discriminator steps, then one generator step, then EMA and bookkeeping.
Every loss decision (which forwards, what is detached, which D is frozen) is in `d_step`/`g_step`
below; the formulas themselves live in `rgan_dist.losses`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import random
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rgan_dist import losses
from rgan_dist.checkpoint import PREVIOUS, TRACKER_FILES, CheckpointManager, load_checkpoint, previous_run, set_aside
from rgan_dist.config import Config, dump_config
from rgan_dist.data import BatchIterator, make_batches, to_model_input
from rgan_dist.ema import EMA
from rgan_dist.engine.strategy import Strategy, make_strategy
from rgan_dist.errors import UsageError
from rgan_dist.metrics.evaluator import make_evaluator
from rgan_dist.models import build_models, describe
from rgan_dist.samples import save_grid
from rgan_dist.tracking import Tracker, make_tracker, run_tags


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps: the run cannot recover by skipping."""


class Callback:
    """Hooks a caller adds to a run without subclassing the Trainer (the sweep's trial reports each evaluation
    to Tune, injects its test fault, sets PBT's hyperparameters). Every method is optional: an object with
    any subset of them works, and this class is a no-op base to subclass for convenience.

    - `on_start(trainer)`: fired by `train()` once the Trainer is built (models placed, checkpoint resumed,
      so `trainer.step` is the resumed step), before the first step.
    - `on_step_end(trainer, step, metrics)`: after every outer step, once the step's metrics were logged.
      `metrics` is the logged dict (floats, averaged over ranks) on a logging step (`train.log_every`) and
      `{}` on the others, so a callback never forces a host sync the loop would not make anyway. Fired
      before the step's samples, evaluation and checkpoint.
    - `on_eval(trainer, step, results)`: after each evaluation (`Trainer.evaluate`, in the loop or called
      directly), once its results were logged and best.pt saved.
    - `on_end(trainer, result, error)`: fired by `train()` after `fit()` returned (`error` None) or raised
      (`result` None), while the strategy and tracker are still open (a collective such as
      `trainer.save_checkpoint()` is allowed: every rank is there, also after `TrainingDiverged`, which
      the ranks raise at the same step).

    Stopping. `on_step_end` and `on_eval` may return True, or call `trainer.request_stop()`: the loop
    finishes the current step (samples, evaluation, checkpoint), saves the final checkpoint and returns
    with `TrainResult.stopped` set (not `interrupted`: nothing went wrong). Under several ranks the
    request is agreed in the loop's one per-step `any_rank`, so a request on any rank stops every rank
    after the same step. A callback may also raise: Tune's `report` ends a stopped trial with
    `SystemExit(0)`, which `train()` closes as a finished run."""

    def on_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> bool | None: ...

    def on_eval(self, trainer: Trainer, step: int, results: dict[str, float]) -> bool | None: ...

    def on_end(self, trainer: Trainer, result: TrainResult | None, error: BaseException | None) -> None: ...


class Evaluator(Protocol):
    """Called every `eval.every` steps with the generator to judge; returns metrics such as fid/kid."""

    def __call__(self, step: int, generator: torch.nn.Module) -> dict[str, float]: ...


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    checkpoint: Path | None
    samples: list[Path] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)
    bad_steps: int = 0
    interrupted: bool = False   # Ctrl-C or SIGTERM
    stopped: bool = False       # a callback asked to stop (`Trainer.request_stop`)
    seconds: float = 0.0        # whole fit(), final checkpoint and samples included
    loop_seconds: float = 0.0   # the step loop alone: what throughput figures divide by


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Holds the run's state (models via the strategy, EMA, data stream, counters) and steps it."""

    def __init__(self, cfg: Config, strategy: Strategy | None = None, tracker: Tracker | None = None,
                 evaluator: Evaluator | None = None, callbacks: Sequence[Any] = ()) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.stop_requested = False
        self.s = strategy or make_strategy(cfg)
        # Every rank builds the same models, then seeds its own stream: DeepSpeed broadcasts parameters but
        # not buffers, and spectral norm's u/v drawn from seed + rank differed between ranks for ~30 steps.
        seed_everything(cfg.train.seed)
        m = cfg.model
        G, D = build_models(m.arch, resolution=m.resolution, z_dim=m.z_dim, width=m.width,
                            max_width=m.max_width, channels=m.channels, spectral_norm=m.spectral_norm,
                            g_batch_norm=m.g_batch_norm, d_batch_norm=m.d_batch_norm, pack=m.pack)
        seed_everything(cfg.train.seed + self.s.rank)
        self.model_summary = describe(G, D)
        self.s.prepare(G, D)
        self.ema = EMA(self.s.g_module, cfg.train.ema) if cfg.train.ema > 0 else None
        # Noise, penalty interpolation and flips draw from one per-rank generator on the device, so the
        # whole stream of randomness is a single state to checkpoint (exact resume).
        self.gen = torch.Generator(self.s.device).manual_seed(cfg.train.seed * 7919 + self.s.rank)
        self.fixed_z = torch.randn(cfg.train.sample_grid**2, m.z_dim,
                                   generator=torch.Generator().manual_seed(cfg.train.seed)).to(self.s.device)
        self.ckpt = CheckpointManager(cfg.checkpoint_dir, keep=cfg.checkpoint.keep)
        self._grad_norms: dict[str, torch.Tensor] = {}
        self._want_grad_norms = False
        for phase, opt in self.s.opt.items():
            # Only plain torch optimizers see whole, synchronised gradients (DeepSpeed ZeRO's see a shard).
            if isinstance(opt, torch.optim.Optimizer):
                opt.register_step_pre_hook(functools.partial(self._record_grad_norm, phase))
        self.step = 0
        self.bad_steps_total = 0
        self.reals_drawn = 0  # real images this rank took from the data stream in this process
        self.bad_in_a_row = {"d": 0, "g": 0}
        self.best_fid = math.inf
        self.samples: list[Path] = []
        self._claim_run_folder(tracker_given=tracker is not None)
        data_state = self._maybe_resume()
        self.data: BatchIterator = make_batches(cfg, rank=self.s.rank, world_size=self.s.world_size,
                                                device=self.s.device, state=data_state)
        # Last, so a run that fails to start leaves no open MLflow run; the evaluator first, so a missing
        # Inception network fails before a run is created.
        self.evaluator = evaluator if evaluator is not None else make_evaluator(cfg, self.s)
        self.tracker = tracker if tracker is not None else make_tracker(cfg, self.s.is_main, tags=run_tags(
            cfg, strategy=self.s.name, world_size=self.s.world_size, device=self.s.device,
            extra={"rgan.model": self.model_summary}) if self.s.is_main else None)
        if getattr(self.evaluator, "tracker", False) is None:  # an evaluator that logs, not yet told where
            self.evaluator.tracker = self.tracker

    # ---- one step --------------------------------------------------------------------------------

    def _reals(self) -> torch.Tensor:
        t = self.cfg.train
        real = to_model_input(next(self.data), self.s.device, channels_last=t.channels_last,
                              flip=t.flip, generator=self.gen)
        self.reals_drawn += real.shape[0]  # what img/s counts: images the steps consumed, nothing assumed
        return real

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, device=self.s.device, generator=self.gen)

    def d_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, s = self.cfg, self.s
        with torch.no_grad(), s.autocast():
            fake = s.g(self._z(real.shape[0]))
        with s.autocast():
            c_real, c_fake = s.d(real), s.d(fake)
            loss = losses.d_loss(cfg.loss.name, c_real, c_fake, means=s.batch_means)
        # The penalty is part of the same loss so there is exactly one backward per D step.
        pen = losses.penalty(cfg.loss.penalty, s.d_penalty, real, fake, cfg.loss.penalty_weight,
                             generator=self.gen, grad_scale=s.grad_scale("d"))
        total = loss + pen
        stepped = self._guarded_step("d", total)
        return {"d_loss": loss.detach(), "penalty": pen.detach(), "d_real": c_real.detach().float().mean(),
                "d_fake": c_fake.detach().float().mean(), "d_stepped": torch.tensor(float(stepped), device=s.device)}

    def g_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, s = self.cfg, self.s
        with s.frozen_d(), s.autocast():
            c_fake = s.d_frozen(s.g(self._z(real.shape[0])))
            # Relativistic losses compare with reals in the G step too; D is frozen, so no grad flows.
            c_real = s.d_frozen(real) if losses.needs_real_in_g_step(cfg.loss.name) else c_fake.detach()
            loss = losses.g_loss(cfg.loss.name, c_real, c_fake, means=s.batch_means)
        stepped = self._guarded_step("g", loss)
        return {"g_loss": loss.detach(), "g_stepped": torch.tensor(float(stepped), device=s.device)}

    def _guarded_step(self, phase: str, loss: torch.Tensor) -> bool:
        """Skip (and count) a step whose loss is not finite on some rank, instead of poisoning weights.

        Consecutive failures are counted per phase: a D that is always NaN between healthy G steps
        is still a diverged run."""
        if self.s.all_finite(loss):
            self.s.backward_step(phase, loss)
            self.bad_in_a_row[phase] = 0
            return True
        self.s.zero_grad(phase)
        self.bad_steps_total += 1
        self.bad_in_a_row[phase] += 1
        if self.bad_in_a_row[phase] >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_in_a_row[phase]} consecutive non-finite {phase.upper()} losses at step {self.step}: "
                f"the run diverged; lower train.lr_d/lr_g, add a penalty, or use train.precision=fp32")
        return False

    def _record_grad_norm(self, phase: str, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer pre-step hook: the L2 norm of the phase's whole gradient (after DDP's all-reduce and
        fp16 unscaling), kept as a device tensor (no sync) and only on steps that are logged."""
        if not self._want_grad_norms:
            return
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
            self._grad_norms[f"{phase}_grad_norm"] = torch.linalg.vector_norm(norms)

    def train_step(self) -> dict[str, torch.Tensor]:
        real = self._reals()
        for i in range(self.cfg.train.n_dis):
            if i:
                real = self._reals()
            out = self.d_step(real)
        # Only relativistic G losses look at reals; for the others a fresh batch would be decoded for nothing.
        if self.cfg.train.fresh_real_for_g and losses.needs_real_in_g_step(self.cfg.loss.name):
            real = self._reals()
        out.update(self.g_step(real))
        if self.ema is not None:
            self.ema.update(self.s.g_module)
        self.step += 1
        return out

    # ---- the run --------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg, s = self.cfg, self.s
        t = cfg.train
        if s.is_main:
            print(f"rgan: {self.model_summary}; loss {cfg.loss.name} + penalty {cfg.loss.penalty}; "
                  f"strategy {s.name} x{s.world_size} on {s.device}; precision {t.precision}", flush=True)
            print(f"rgan: outputs in {cfg.out_dir}, checkpoints in {cfg.checkpoint_dir}", flush=True)
        progress = _progress(t.steps, self.step, enabled=s.is_main and t.progress)
        interrupted = False
        stop = _StopRequest(distributed=s.world_size > 1)
        window_start, window_reals = time.perf_counter(), self.reals_drawn
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        stopped = False
        try:
            while self.step < t.steps:
                self._want_grad_norms = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps
                out = self.train_step()
                s.fault_point("step", self.step)
                logged: dict[str, float] = {}
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - window_start
                    out.update(self._grad_norms)  # the same keys on every rank: gradients are synchronised
                    self._grad_norms = {}
                    metrics = s.reduce_mean(out)
                    # every rank draws the same number of images per step
                    images = (self.reals_drawn - window_reals) * s.world_size
                    metrics.update(img_per_s=images / max(elapsed, 1e-9),
                                   skipped_samples=float(self.data.skipped),
                                   bad_steps=float(self.bad_steps_total))
                    self.tracker.log_metrics(metrics, self.step)
                    progress.set_postfix(d=f"{metrics['d_loss']:.3f}", g=f"{metrics['g_loss']:.3f}",
                                         img_s=f"{metrics['img_per_s']:.0f}", refresh=False)
                    window_start, window_reals = time.perf_counter(), self.reals_drawn
                    logged = metrics
                self._fire_stoppable("on_step_end", self.step, logged)
                progress.update(1)
                if t.sample_every and self.step % t.sample_every == 0:
                    self.save_samples()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    eval_start = time.perf_counter()
                    self.evaluate()
                    window_start += time.perf_counter() - eval_start  # img/s measures training, not eval
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                # Ranks agree to stop at the same step (one tiny all-reduce), so the final checkpoint's
                # gathers line up even when the signal (or a callback's request) reached them at different
                # moments. One process: a signal raised at once; only a callback's request is left here.
                wants = stop.requested or self.stop_requested
                if (s.any_rank(wants) if stop.enabled else wants) and self.step < t.steps:
                    if not self.stop_requested:
                        raise KeyboardInterrupt
                    stopped = True
                    if s.is_main:
                        print(f"rgan: stopped at step {self.step} at a callback's request", flush=True)
                    break
        except KeyboardInterrupt:
            interrupted = True
            if s.is_main:
                print(f"\nrgan: interrupted at step {self.step}; saving a final checkpoint", flush=True)
        finally:
            loop_seconds = time.perf_counter() - t0
            progress.close()
            stop.restore()
        path = self.save_checkpoint()
        if not interrupted and (not self.samples or not self.samples[-1].stem.endswith(f"{self.step:07d}")):
            self.save_samples()
        return TrainResult(step=self.step, out_dir=cfg.out_dir, checkpoint=path, samples=self.samples,
                           last_metrics=metrics, bad_steps=self.bad_steps_total, interrupted=interrupted,
                           stopped=stopped, seconds=time.perf_counter() - t0, loop_seconds=loop_seconds)

    # ---- samples, eval, checkpoints ---------------------------------------------------------------

    @property
    def eval_generator(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None and self.cfg.eval.use_ema else self.s.g_module

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        if not self.s.is_main:
            return None
        # the EMA copy's BatchNorm statistics are recomputed for its own weights first (rgan_dist.ema)
        G = self.ema.recalibrated(self.cfg) if self.ema is not None else self.s.g_module
        was_training = G.training
        G.eval()
        with self.s.autocast():
            images = G(self.fixed_z)
        G.train(was_training)
        path = save_grid(images, self.cfg.out_dir / "samples" / f"step_{self.step:07d}.png",
                         nrow=self.cfg.train.sample_grid)
        self.samples.append(path)
        self.tracker.log_artifact(path, "samples")
        return path

    def evaluate(self) -> dict[str, float]:
        result = self._evaluate() if self.evaluator is not None else {}
        self._fire_stoppable("on_eval", self.step, result)
        return result

    def _evaluate(self) -> dict[str, float]:
        G = self.eval_generator
        if self.ema is not None and G is self.ema.module:
            self.ema.recalibrated(self.cfg)  # same seed on every rank; then rank 0's buffers win anyway
        self.s.sync_buffers(self._buffered_modules())
        result = self.evaluator(self.step, G)
        if result:  # with the protocol the value was computed under, when the evaluator says it
            self.tracker.log_metrics(result, self.step, context=getattr(self.evaluator, "protocol", None))
        fid = result.get("fid")
        if fid is not None and fid < self.best_fid:
            self.best_fid = fid
            state = self.state_dict()
            if self.s.is_main:
                self.ckpt.save_best(state)
        return result

    # ---- callbacks --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """End the run after the current step, with a final checkpoint (see `Callback`)."""
        self.stop_requested = True

    def fire(self, hook: str, *args: Any) -> list[Any]:
        """Call `hook(self, *args)` on every callback that has it, in order; their return values."""
        return [getattr(cb, hook)(self, *args) for cb in self.callbacks if hasattr(cb, hook)]

    def _fire_stoppable(self, hook: str, *args: Any) -> None:
        if any(r is True for r in self.fire(hook, *args)):
            self.request_stop()

    def _buffered_modules(self) -> list[torch.nn.Module]:
        mods = [self.s.g_module, self.s.d_module]
        return mods + [self.ema.module] if self.ema is not None else mods

    def state_dict(self) -> dict[str, Any]:
        """This rank's view of the run. Not a collective (best.pt calls it on rank 0 alone); the
        per-rank parts of every rank are gathered by `save_checkpoint`."""
        return {
            "format": "rgan-dist/1",
            "step": self.step,
            "config": dump_config(self.cfg),
            "model": self.s.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": self._rng_state(),
            "data": self.data.state(),
            "world_size": self.s.world_size,
            "bad_steps": self.bad_steps_total,
            "best_fid": self.best_fid,
        }

    def _rng_state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {"torch": torch.get_rng_state(), "gen": self.gen.get_state(),
                "cuda": torch.cuda.get_rng_state() if self.s.device.type == "cuda" else None,
                "python": random.getstate(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}

    def _set_rng_state(self, rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        self.gen.set_state(rng["gen"])
        if rng.get("cuda") is not None and self.s.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        if rng.get("python") is not None:
            random.setstate(rng["python"])
        if rng.get("numpy") is not None:
            name, key, *rest = rng["numpy"]
            np.random.set_state((name, key.numpy().astype(np.uint32), *rest))

    def _fingerprints(self) -> dict[str, str]:
        """Hashes of this rank's G, D and EMA parameters and buffers: equal on every rank, or the ranks
        diverged. BatchNorm's running statistics are left out: they are per rank by design until
        `sync_buffers`, which runs after this (it would hide a divergence of the other buffers, e.g.
        spectral norm's u/v, which must agree at every step)."""
        modules = {"G": self.s.g_module, "D": self.s.d_module}
        if self.ema is not None:
            modules["EMA"] = self.ema.module
        out = {}
        for name, module in modules.items():
            h = hashlib.sha256()
            buffers = [b for sub in module.modules() if not isinstance(sub, torch.nn.modules.batchnorm._BatchNorm)
                       for b in sub.buffers(recurse=False)]
            for t in [*module.parameters(), *buffers]:
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            out[name] = h.hexdigest()
        return out

    def save_checkpoint(self) -> Path | None:
        """Collective: every rank calls it at the same step. Rank 0 writes one file holding every rank's
        RNG state and data position; sharded strategies first write their parts into the step's folder."""
        s = self.s
        fingerprint = self._fingerprints()
        s.sync_buffers(self._buffered_modules())
        state = self.state_dict()
        ranks = s.all_gather_object({"rng": state["rng"], "data": state["data"], "fingerprint": fingerprint})
        sidecar = self.ckpt.sidecar(self.step)
        if s.is_main and sidecar.exists():  # left by a job killed while saving this very step
            shutil.rmtree(sidecar)
        s.barrier()
        if s.save_sharded(sidecar):
            state["sharded"] = sidecar.name
        s.barrier()  # every rank's part is on disk before the file that makes the checkpoint count
        path = None
        if s.is_main:
            if any(r["fingerprint"] != ranks[0]["fingerprint"] for r in ranks):
                raise RuntimeError(f"ranks diverged at step {self.step}: parameter/buffer hashes differ "
                                   f"({[r['fingerprint'] for r in ranks]}); not writing a checkpoint")
            state["ranks"] = ranks
            path = self.ckpt.save(self.step, state, before_commit=lambda: s.fault_point("save", self.step))
        s.barrier()
        return path

    def _claim_run_folder(self, tracker_given: bool) -> None:
        """A run folder belongs to one run: a fresh run (checkpoint.resume '') never writes beside another
        run's checkpoints or into its metrics.jsonl. It refuses, or with checkpoint.overwrite moves the old
        files aside (`set_aside`; never deleted). Collective, like `_resolve_resume`: what any rank sees
        decides for all, so every rank raises or none does; rank 0 alone moves, then a barrier. A tracker
        the caller made (the sweep's) has already written this run's config.yaml/mlflow_run.json: kept."""
        cfg = self.cfg
        if cfg.checkpoint.resume:
            return
        mine = [str(p) for p in previous_run(cfg.out_dir, cfg.checkpoint_dir)]
        old = sorted({p for seen in self.s.all_gather_object(mine) for p in seen})
        if not old:
            return
        if not cfg.checkpoint.overwrite:
            latest = self.ckpt.latest()
            what = f"checkpoints up to {latest.name}" if latest is not None else ", ".join(Path(p).name for p in old)
            raise UsageError(f"{cfg.checkpoint_dir if latest is not None else cfg.out_dir} already holds another run "
                             f"({what}): continue it with --resume auto, move it aside with --overwrite "
                             f"(checkpoint.overwrite=true; kept in {cfg.out_dir / PREVIOUS}/), or set another "
                             f"run.out_dir")
        if self.s.is_main:
            moved = set_aside([Path(p) for p in old if Path(p).exists()], cfg.out_dir, cfg.checkpoint_dir,
                              keep=TRACKER_FILES if tracker_given else ())
            print(f"rgan: moved the previous run's files in this folder to {' and '.join(map(str, moved))}",
                  flush=True)
        self.s.barrier()

    def _resolve_resume(self) -> Path | None:
        """The checkpoint to resume, the same on every rank (or one clear error on every rank)."""
        try:
            found: Path | str | None = self.ckpt.resolve(self.cfg.checkpoint.resume)
        except UsageError as e:
            found = f"error: {e}"
        seen = self.s.all_gather_object(str(found) if found is not None else None)
        for item in seen:
            if item is not None and item.startswith("error: "):
                raise UsageError(item[len("error: "):])
        if len(set(seen)) > 1:
            raise UsageError(f"checkpoint.resume={self.cfg.checkpoint.resume!r}: ranks found different checkpoints "
                             f"({sorted(set(map(str, seen)))}); checkpoint.dir must be storage every node shares")
        return Path(seen[0]) if seen[0] is not None else None

    def _maybe_resume(self) -> dict[str, Any] | None:
        path = self._resolve_resume()
        if path is None:
            return None
        state = load_checkpoint(path)
        if state.get("format") != "rgan-dist/1":
            raise UsageError(f"checkpoint {str(path)!r}: not an rgan-dist training checkpoint")
        sharded = path.parent / state["sharded"] if state.get("sharded") else None
        self.s.load_state_dict(state["model"], sharded=sharded)
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.bad_steps_total = int(state["bad_steps"])
        self.best_fid = float(state["best_fid"])
        ranks = state.get("ranks") or [{"rng": state["rng"], "data": state["data"]}]
        if len(ranks) == self.s.world_size:
            mine = ranks[self.s.rank]
        else:
            # The RNG and data split depend on the world size: the models and optimizers resume exactly,
            # the noise and data order continue from a fresh per-rank seed instead.
            if self.s.is_main:
                print(f"rgan: warning: {path} was written by {len(ranks)} rank(s), this job has "
                      f"{self.s.world_size}: resuming weights and optimizers; noise and data order restart "
                      f"from seed+step", flush=True)
            self.gen.manual_seed(self.cfg.train.seed * 7919 + self.s.rank + 104_729 * self.step)
            mine = {"rng": None, "data": {"epoch": ranks[0]["data"].get("epoch", 0) + 1, "batch": 0}}
        if mine["rng"] is not None:
            self._set_rng_state(mine["rng"])
        if self.s.is_main:
            print(f"rgan: resumed from {path} at step {self.step}", flush=True)
        return mine["data"]


class _StopRequest:
    """SIGTERM (a scheduler's pre-emption notice) stops the loop like Ctrl-C: a final checkpoint is saved.

    One process: the handler raises KeyboardInterrupt at once. Several ranks: the handlers (SIGTERM and
    SIGINT) only set a flag that the loop all-reduces after each step, so every rank stops after the same
    step and the final checkpoint's collectives line up (an exception in the middle of a collective
    would leave the ranks in different places)."""

    def __init__(self, distributed: bool) -> None:
        self.enabled = distributed
        self.requested = False
        self._previous: dict[int, Any] = {}
        signals = (signal.SIGTERM, signal.SIGINT) if distributed else (signal.SIGTERM,)
        for sig in signals:
            # not the main thread (e.g. inside a Ray worker thread): leave signals alone
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.enabled or self.requested:  # a second signal: stop now, without the agreed step
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)


def train(cfg: Config, strategy: Strategy | None = None, *, callbacks: Sequence[Any] = (),
          **kwargs: Any) -> TrainResult:
    """The one lifecycle of a run, for `rgan train`, the sweep's trials and tests: build a Trainer for `cfg`,
    fire `on_start`, run it to `train.steps`, fire `on_end`, log the final and best checkpoints, then close
    the tracker and the strategy (with it the process group), given or not, also when building fails.

    The tracker's status: FINISHED, KILLED (Ctrl-C/SIGTERM), or FAILED; a `SystemExit(0)` raised inside
    the run (Tune's `report` ending a stopped trial) is the host ending it on purpose: FINISHED."""
    s = strategy or make_strategy(cfg)
    trainer: Trainer | None = None
    status = "FAILED"
    try:
        trainer = Trainer(cfg, strategy=s, callbacks=callbacks, **kwargs)
        trainer.fire("on_start")
        try:
            result = trainer.fit()
        except BaseException as e:
            trainer.fire("on_end", None, e)
            raise
        trainer.fire("on_end", result, None)
        status = "KILLED" if result.interrupted else "FINISHED"
        if result.checkpoint is not None:
            trainer.tracker.log_checkpoint(result.checkpoint, "final")
        trainer.tracker.log_checkpoint(trainer.ckpt.dir / "best.pt", "best")
        return result
    except SystemExit as e:
        if e.code in (0, None):
            status = "FINISHED"
        raise
    finally:
        if trainer is not None:
            trainer.tracker.close(status)
        s.close()
