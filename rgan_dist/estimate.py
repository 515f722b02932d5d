"""What a run or a sweep will cost, before it starts: `rgan train --dry-run` and `rgan sweep --dry-run`.

Why measure instead of model: a GAN step's time depends on the architecture, the penalty (a double
backward), n_D, precision, the strategy and the data reader on *this* machine, and a few real steps
capture all of them. So the step time comes from a real `Trainer` built in a throw-away folder (no
MLflow, no evaluation, no sample grids, no checkpoints kept), stepped a few times after a warm-up, in one
process; or from `--step-time SECONDS` when the user already knows it (from a previous run's img/s, or
for another machine). Everything else is arithmetic on the config:

- wall time = steps x step time (a run); a sweep packs its trials onto the concurrent slots in order
  (first free slot first), as Tune's FIFO does. With ASHA or PBT that is an upper bound: early stopping
  only shortens it.
- device-hours = wall time x devices (ranks; a sweep's trial: workers x GPUs per worker, or workers on CPU).
- images per second = real images drawn per step (n_D batches, plus one for a relativistic G step with
  `train.fresh_real_for_g`) x ranks / step time.
- data volume per epoch from the shard manifest (the shards' bytes), and how many epochs the run streams.

Evaluation (FID/KID), sample grids and checkpoints are not timed: the estimate says so and how many
evaluations of how many samples the run will do. Measuring in one process excludes the all-reduce between
ranks, which the estimate also says.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rgan_dist.config import Config, config_from_dict
from rgan_dist.errors import UsageError

WARMUP_STEPS = 2
MEASURED_STEPS = 5


@dataclass
class StepTime:
    seconds: float        # one generator step (with its n_D discriminator steps), one rank
    reals_per_step: float  # real images one rank draws per step
    source: str           # how it was obtained, in words


@dataclass
class DataVolume:
    spec: str
    samples: int | None       # per epoch
    bytes: int | None         # per epoch
    shards: int | None
    note: str = ""

    @property
    def bytes_per_sample(self) -> float | None:
        return self.bytes / self.samples if self.bytes is not None and self.samples else None


@dataclass
class RunEstimate:
    name: str
    steps: int
    ranks: int
    step: StepTime
    data: DataVolume
    evaluations: int
    eval_samples: int
    eval_metrics: list[str]

    @property
    def wall_seconds(self) -> float:
        return self.steps * self.step.seconds

    @property
    def device_hours(self) -> float:
        return self.wall_seconds * self.ranks / 3600

    @property
    def img_per_s(self) -> float:
        return self.step.reals_per_step * self.ranks / self.step.seconds

    @property
    def images(self) -> float:
        return self.steps * self.step.reals_per_step * self.ranks

    @property
    def epochs(self) -> float | None:
        return self.images / self.data.samples if self.data.samples else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "ranks": self.ranks, "step_seconds": self.step.seconds,
                "step_time_source": self.step.source, "wall_seconds": self.wall_seconds,
                "device_hours": self.device_hours, "img_per_s": self.img_per_s, "images": self.images,
                "evaluation": {"count": self.evaluations, "samples": self.eval_samples,
                               "metrics": self.eval_metrics, "seconds": None, "note": "not timed (excluded)"},
                "data": {**asdict(self.data), "bytes_per_sample": self.data.bytes_per_sample,
                         "epochs_streamed": self.epochs}}


# ---- the step time -----------------------------------------------------------------------------------

def reals_per_step(cfg: Config) -> int:
    """Real images one rank draws per generator step (`Trainer.train_step`)."""
    from rgan_dist.losses import needs_real_in_g_step

    fresh = cfg.train.fresh_real_for_g and needs_real_in_g_step(cfg.loss.name)
    return cfg.train.batch_size * (cfg.train.n_dis + int(fresh))


def given_step_time(cfg: Config, seconds: float) -> StepTime:
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"--step-time {seconds!r}: give the seconds one generator step takes, a number > 0")
    return StepTime(float(seconds), reals_per_step(cfg), "given (--step-time)")


def measure_step_time(cfg: Config, *, warmup: int = WARMUP_STEPS, steps: int = MEASURED_STEPS) -> StepTime:
    """A real Trainer for `cfg`, in one process and a temporary folder, timed over `steps` steps after
    `warmup` (the first steps pay for allocator growth, cuDNN autotuning, data-loader start-up)."""
    import torch

    from rgan_dist.engine.loop import Trainer

    launched = [k for k in ("RANK", "WORLD_SIZE") if int(os.environ.get(k, "0") or 0) > (0 if k == "RANK" else 1)]
    if launched:
        raise UsageError("--dry-run measures one process: run it as a plain `rgan train --dry-run ...` (not under "
                         "torchrun/deepspeed) and give the ranks with --world-size N")
    with tempfile.TemporaryDirectory(prefix="rgan-dry-run-") as tmp:
        probe = config_from_dict(cfg.to_dict(as_given=True), where="dry run", values={
            "run.out_dir": str(Path(tmp) / "run"), "checkpoint.dir": "", "checkpoint.resume": "",
            "checkpoint.every": 0, "checkpoint.overwrite": False, "eval.every": 0, "train.sample_every": 0,
            "train.progress": False, "tracking.enabled": False, "train.steps": warmup + steps,
            "train.log_every": warmup + steps})
        saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        trainer = None
        try:
            trainer = Trainer(probe)
            sync = torch.cuda.synchronize if trainer.strategy.device.type == "cuda" else (lambda: None)
            for _ in range(warmup):
                trainer.train_step()
            sync()
            drawn, t0 = trainer.reals_drawn, time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            sync()
            seconds = (time.perf_counter() - t0) / steps
            reals = (trainer.reals_drawn - drawn) / steps
            where = f"{trainer.strategy.device.type}, strategy {trainer.strategy.name}"
        finally:
            if trainer is not None:
                with contextlib.suppress(Exception):
                    trainer.data.close()
                with contextlib.suppress(Exception):
                    trainer.tracker.close("FINISHED")
                with contextlib.suppress(Exception):
                    trainer.strategy.close()
            for k, v in saved.items():  # a strategy fills these for a world of one; the next probe starts clean
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return StepTime(seconds, reals, f"measured: {steps} steps after {warmup} warm-up, one process ({where})")


# ---- the data ----------------------------------------------------------------------------------------

def data_volume(cfg: Config) -> DataVolume:
    """Samples and bytes of one epoch of `data.shards`: the manifest's shard sizes, else the local files'."""
    spec = cfg.data.shards
    if spec.startswith("sklearn:"):
        from sklearn.datasets import load_digits

        n = len(load_digits().images)
        return DataVolume(spec, n, None, None, "embedded, held in memory: nothing is streamed")
    from data_pipeline.shardset import is_remote, resolve

    shards = resolve(spec, resolution=cfg.model.resolution, count=False)
    sizes = [s.get("bytes") for s in (shards.manifest or {}).get("shards", [])]
    if sizes and all(isinstance(b, int) for b in sizes):
        return DataVolume(spec, shards.num_samples, sum(sizes), len(sizes), "from the manifest")
    if not any(is_remote(u) for u in shards.urls):
        total = sum(Path(u.removeprefix("file:")).stat().st_size for u in shards.urls)
        return DataVolume(spec, shards.num_samples, total, len(shards.urls), "from the shard files")
    return DataVolume(spec, shards.num_samples, None, len(shards.urls), "shard sizes unknown (no manifest sizes)")


# ---- a run -------------------------------------------------------------------------------------------

def estimate_run(cfg: Config, *, ranks: int = 1, step_time: float | None = None,
                 step: StepTime | None = None) -> RunEstimate:
    if ranks < 1:
        raise UsageError(f"--world-size {ranks}: give the number of ranks, >= 1")
    if step is None:
        step = given_step_time(cfg, step_time) if step_time is not None else measure_step_time(cfg)
    e = cfg.eval
    return RunEstimate(cfg.run.name, cfg.train.steps, ranks, step, data_volume(cfg),
                       cfg.train.steps // e.every if e.every else 0, e.num_samples, list(e.metrics))


def duration(seconds: float) -> str:
    """`1d 3h`, `3h 25m`, `4m 10s`, `12.3s`: wall time as people plan with it."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def size(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def data_lines(d: DataVolume, epochs: float | None) -> list[str]:
    if d.bytes is None:
        per = f"{d.samples} samples" if d.samples else "samples unknown"
        return [f"data         {per} per epoch; {d.note}"]
    run = f"; the run streams {epochs:.1f} epoch(s), {size(d.bytes * epochs)}" if epochs is not None else ""
    return [f"data         {d.samples} samples, {size(d.bytes)} in {d.shards} shard(s) per epoch "
            f"({size(d.bytes_per_sample)}/sample, {d.note}){run}"]


def format_run(est: RunEstimate) -> list[str]:
    s = est.step
    evals = (f"excluded (not timed): {est.evaluations} evaluation(s) of {est.eval_samples} samples "
             f"({', '.join(est.eval_metrics)})" if est.evaluations else "none (eval.every=0)")
    return [
        f"rgan train: dry run of {est.name!r}: nothing trained, no run folder written",
        f"step time    {s.seconds:.4g} s per generator step ({s.source})",
        f"throughput   {est.img_per_s:.1f} img/s ({s.reals_per_step:g} real images per step x {est.ranks} rank(s))",
        f"training     {est.steps} steps -> {duration(est.wall_seconds)} wall, {est.device_hours:.3g} device-hours "
        f"({est.ranks} rank(s){'; all-reduce between ranks not measured' if est.ranks > 1 else ''})",
        f"evaluation   {evals}; sample grids and checkpoints not timed either",
        *data_lines(est.data, est.epochs),
    ]


# ---- a sweep -----------------------------------------------------------------------------------------

@dataclass
class SweepEstimate:
    trials: list[RunEstimate]
    devices_per_trial: float
    concurrency: int
    concurrency_basis: str
    scheduler: str

    @property
    def wall_seconds(self) -> float:
        """Trials started in order on the first free slot (Tune's FIFO): the makespan."""
        slots = [0.0] * self.concurrency
        for t in self.trials:
            heapq.heappush(slots, heapq.heappop(slots) + t.wall_seconds)
        return max(slots) if slots else 0.0

    @property
    def device_hours(self) -> float:
        return sum(t.wall_seconds for t in self.trials) * self.devices_per_trial / 3600

    @property
    def upper_bound(self) -> bool:
        return self.scheduler in ("asha", "pbt")

    def to_dict(self) -> dict[str, Any]:
        return {"trials": len(self.trials), "concurrency": self.concurrency,
                "concurrency_basis": self.concurrency_basis, "devices_per_trial": self.devices_per_trial,
                "scheduler": self.scheduler, "upper_bound": self.upper_bound, "wall_seconds": self.wall_seconds,
                "device_hours": self.device_hours, "per_trial": [t.to_dict() for t in self.trials]}


def estimate_sweep(spec: Any, *, step_time: float | None = None, num_cpus: int | None = None,
                   address: str | None = None) -> SweepEstimate:
    """Every planned trial's config (its grid values; a randomly drawn value keeps the base's) timed once
    per distinct config, or all given `step_time`."""
    from rgan_dist.sweep import planned_trials, trial_overrides
    from rgan_dist.sweep.space import distribution

    res = spec.resources
    measured: dict[str, StepTime] = {}
    trials = []
    for i, trial in enumerate(planned_trials(spec)):
        drawn = {k: v for k, v in trial.items() if distribution(spec.space.get(k), k)[0] in ("grid", "fixed")}
        values = trial_overrides(drawn)
        cfg = config_from_dict(spec.base_config.to_dict(as_given=True), where=f"trial {i}", values=values)
        key = json.dumps(values, sort_keys=True, default=str)
        if key not in measured:
            measured[key] = (given_step_time(cfg, step_time) if step_time is not None
                             else measure_step_time(cfg))
        trials.append(estimate_run(cfg, ranks=res.workers, step=measured[key]))
        trials[-1].name = f"{i:03d}"
    per_trial = res.workers * (res.gpus_per_worker if res.gpus_per_worker > 0 else 1)
    if res.gpus_per_worker > 0:
        import torch

        have, unit, need = torch.cuda.device_count(), "GPU(s)", res.workers * res.gpus_per_worker
    else:
        have, unit, need = num_cpus or os.cpu_count() or 1, "CPU(s)", res.workers * res.cpus_per_worker
    fit = max(1, int(have // need)) if need > 0 else len(trials)
    basis = f"{have} {unit} {'of --num-cpus' if num_cpus else 'on this machine'} / {need:g} per trial"
    if need > have:
        basis = f"this machine has {have} {unit}, a trial needs {need:g}: planned as one at a time"
    if address:
        basis += " (the cluster's size is not known before Ray starts: pass --num-cpus to plan for it)"
    if spec.max_concurrent_trials and spec.max_concurrent_trials < fit:
        fit, basis = spec.max_concurrent_trials, f"max_concurrent_trials={spec.max_concurrent_trials}"
    return SweepEstimate(trials, per_trial, max(1, min(fit, len(trials))), basis, spec.scheduler.name)


def format_sweep(est: SweepEstimate) -> list[str]:
    out = ["rgan sweep: estimate (trials as listed above):"]
    for t in est.trials:
        out.append(f"  {t.name}  {t.step.seconds:.4g} s/step  {t.img_per_s:.1f} img/s  {t.steps} steps  "
                   f"{duration(t.wall_seconds)}  {t.evaluations} evaluation(s) of {t.eval_samples} samples")
    sources = sorted({t.step.source for t in est.trials})
    bound = (f"; an upper bound: {est.scheduler} stops or replaces trials early" if est.upper_bound else "")
    first = est.trials[0] if est.trials else None
    out += [
        f"step time    {'; '.join(sources)}",
        f"trials       {len(est.trials)}, {est.concurrency} at once ({est.concurrency_basis}), "
        f"{est.devices_per_trial:g} device(s) each",
        f"total        {duration(est.wall_seconds)} wall, {est.device_hours:.3g} device-hours{bound}",
        "evaluation   excluded (not timed): FID/KID at every eval.every steps adds to each trial",
    ]
    if first is not None:
        out += data_lines(first.data, first.epochs)
    return out
