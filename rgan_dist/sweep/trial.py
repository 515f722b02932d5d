"""Running one trial: the engine's Trainer with a report to Tune (and a checkpoint) at every evaluation,
as one process or as the workers of a Ray Train TorchTrainer."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rgan_dist.config import Config, config_from_dict
from rgan_dist.errors import UsageError
from rgan_dist.sweep.space import describe_trial, trial_index, trial_overrides, trial_run_name

if TYPE_CHECKING:
    from rgan_dist.engine.loop import Trainer

SWEEP_FAULT_ENV = "RGAN_SWEEP_FAULT_INJECT"
FLUSH_TIMEOUT_S = 120.0  # the longest a trial waits for MLflow before handing a report to Tune


@dataclass
class TrialSetup:
    """Everything a trial needs besides its sampled values; shipped to trials with `tune.with_parameters`."""

    sweep: str
    base: dict[str, Any]           # the resolved base config (plain dict, absolute paths)
    out_dir: str                   # trial outputs go to <out_dir>/trials/<trial_id>
    mlflow_uri: str = ""           # "" when tracking is off
    experiment: str = ""
    parent_run_id: str | None = None
    paper: str = ""
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0
    train_storage: str = ""        # Ray Train runs of multi-worker trials
    fault: str = ""                # RGAN_SWEEP_FAULT_INJECT, read on the driver (test hook)

    def trial_config(self, trial_id: str, config: dict[str, Any], resume: str | None) -> Config:
        """Base < the trial's sampled values (`config`, Tune's) < what every trial must have its own of."""
        overrides = trial_overrides(config)
        out = Path(self.out_dir) / "trials" / trial_id
        plumbing = {
            "run.name": trial_run_name(self.sweep, trial_id, config),
            "run.out_dir": str(out),
            "checkpoint.dir": "",
            "checkpoint.every": 0,        # a trial checkpoints at every FID report instead
            "checkpoint.resume": resume or "",
            "checkpoint.overwrite": True,  # a retry Tune restarts from scratch sets the failed attempt aside
            "train.progress": False,      # Ray's logs are no terminal
            "tracking.enabled": bool(self.mlflow_uri) and self.base["tracking"]["enabled"],
            "tracking.mlflow_uri": self.mlflow_uri,
            "tracking.experiment": self.experiment or self.base["tracking"]["experiment"],
        }
        return config_from_dict(self.base, where=f"trial {trial_id}", values={**overrides, **plumbing})


class FaultOnce:
    """`RGAN_SWEEP_FAULT_INJECT=raise@K[:trialN]`: raise at the end of step K, once per trial.

    A test hook, not a feature (like the engine's `RGAN_FAULT_INJECT`, which fires on every attempt and so
    cannot show a retried trial completing). "Once" is kept by a marker file in the trial's output folder,
    so the retry that resumes from the trial's checkpoint runs through step K."""

    def __init__(self, spec: str, trial_id: str, out_dir: Path, rank: int = 0) -> None:
        self.step: int | None = None
        self.marker = out_dir / f".fault-{spec.replace('@', '-').replace(':', '-')}.fired"
        if not spec:
            return
        m = re.fullmatch(r"raise@(\d+)(?::trial(\d+))?", spec.strip())
        if not m:
            raise UsageError(f"{SWEEP_FAULT_ENV}={spec!r}: expected raise@STEP[:trialN], e.g. raise@15")
        if rank == 0 and (m.group(2) is None or int(m.group(2)) == trial_index(trial_id)):
            self.step = int(m.group(1))

    def check(self, step: int) -> None:
        if self.step is not None and step == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"{time.time()}\n")
            raise RuntimeError(f"{SWEEP_FAULT_ENV}: injected failure at step {step}")


class Reporter:
    """Hands each FID evaluation to Tune (or Ray Train), with a Ray checkpoint holding our checkpoint.

    `report_fn(metrics, checkpoint=...)` is `ray.tune.report` in a one-process trial and `ray.train.report`
    in the workers of a multi-worker trial (every worker calls it; rank 0 attaches the checkpoint)."""

    def __init__(self, report_fn: Callable[..., None], checkpoint_cls: Any, *, restored_from: int = 0) -> None:
        self.report_fn = report_fn
        self.checkpoint_cls = checkpoint_cls
        self.restored_from = restored_from
        self.last_step: int | None = None
        self.run_id = ""
        self.before_send: Callable[[Trainer, Path | None], None] | None = None

    def report(self, trainer: Trainer, result: dict[str, float], **extra: Any) -> None:
        path = trainer.save_checkpoint()  # a collective: every rank, same step
        if self.before_send is not None:
            self.before_send(trainer, path)
        fid = float(result.get("fid", math.inf))
        metrics = {"fid": fid, "best_fid": float(trainer.best_fid), "step": int(trainer.step),
                   "restored_from_step": int(self.restored_from), "mlflow_run_id": self.run_id, **extra}
        for key in ("kid", "kid_std", "eval_seconds"):
            if key in result:
                metrics[key] = float(result[key])
        self.last_step = trainer.step
        if path is None:  # not rank 0
            self.report_fn(metrics)
            return
        with _staged(path) as folder:
            self.report_fn(metrics, checkpoint=self.checkpoint_cls.from_directory(str(folder)))


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A folder holding just this checkpoint (its .pt, a DeepSpeed sidecar if any, and a `latest`
    pointer), hard-linked where possible: what Ray copies to its storage as the trial's checkpoint."""
    folder = path.parent / f".ray-{path.stem}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    try:
        link(str(path), str(folder / path.name))
        sidecar = path.with_suffix(".ds")
        if sidecar.is_dir():
            shutil.copytree(sidecar, folder / sidecar.name, copy_function=link)
        (folder / "latest").write_text(path.name)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _set_optimizer_hparams(trainer: Trainer) -> None:
    """After a resume, the optimizers carry the checkpoint's lr/betas; a PBT exploit restarts a trial
    from another trial's checkpoint with new values, which must win."""
    t = trainer.cfg.train
    for phase, lr in (("g", t.lr_g), ("d", t.lr_d)):
        opt = trainer.s.opt.get(phase)
        for group in getattr(opt, "param_groups", []) or []:
            group["lr"] = lr
            if "betas" in group:
                group["betas"] = tuple(t.betas)


class TrialRun:
    """One trial's training: the engine's Trainer with a hook at each evaluation (report to Tune with a
    checkpoint) and after each step (the fault hook); an MLflow child run of the sweep's parent run.

    Built in two phases on purpose: `__init__` loads the checkpoint to resume (while Ray's checkpoint
    folder is still open), `run()` trains."""

    def __init__(self, cfg: Config, setup: TrialSetup, trial_id: str, reporter: Reporter, describe: dict[str, str]
                 ) -> None:
        from rgan_dist.engine.loop import Trainer
        from rgan_dist.engine.strategy import make_strategy
        from rgan_dist.tracking import make_tracker, run_tags

        self.cfg, self.setup, self.trial_id, self.reporter = cfg, setup, trial_id, reporter
        self.strategy = make_strategy(cfg)
        s = self.strategy
        fault = FaultOnce(setup.fault, trial_id, cfg.out_dir, s.rank)
        run = self

        class SweepTrainer(Trainer):
            def train_step(self) -> dict[str, Any]:
                out = super().train_step()
                fault.check(self.step)
                return out

            def evaluate(self) -> dict[str, float]:
                result = super().evaluate()
                run.reporter.report(self, result)
                return result

        self.tracker = None
        self.trainer: Trainer | None = None
        try:
            extra = {"rgan.sweep": setup.sweep, "rgan.sweep.trial_id": trial_id,
                     **{f"rgan.sweep.{k}": v for k, v in describe.items()}}
            if setup.parent_run_id:
                extra["mlflow.parentRunId"] = setup.parent_run_id
            if setup.paper:
                extra["rgan.paper_table"] = setup.paper
            tags = run_tags(cfg, strategy=s.name, world_size=s.world_size, device=s.device,
                            extra={**extra, "mlflow.source.name": "rgan sweep"}) if s.is_main else None
            self.tracker = make_tracker(cfg, s.is_main, tags=tags)
            self.reporter.run_id = str(getattr(self.tracker, "run_id", "") or "")
            self.trainer = SweepTrainer(cfg, strategy=s, tracker=self.tracker)
            self.tracker.set_tags({"rgan.model": self.trainer.model_summary})
        except BaseException:
            if self.tracker is not None:
                self.tracker.close("FAILED")
            s.close()
            raise
        self.reporter.restored_from = self.trainer.step
        self.reporter.before_send = self._before_send
        self.finished = False
        if cfg.checkpoint.resume:
            _set_optimizer_hparams(self.trainer)

    def _log_checkpoints(self, final: Path | None) -> None:
        assert self.tracker is not None and self.trainer is not None
        if final is not None:
            self.tracker.log_checkpoint(final, "final")
        self.tracker.log_checkpoint(self.trainer.ckpt.dir / "best.pt", "best")

    def _before_send(self, trainer: Trainer, path: Path | None) -> None:
        """Tune may end this process as soon as it has a report (the last one: the stop criterion; or one a
        scheduler stops the trial at), without waiting for this thread: what the run still owes MLflow
        (the last step's samples and checkpoints, queued metrics) is done before the report leaves."""
        assert self.tracker is not None
        if trainer.step >= self.cfg.train.steps and not self.finished:
            self.finished = True
            if not trainer.samples or not trainer.samples[-1].stem.endswith(f"{trainer.step:07d}"):
                trainer.save_samples()
            self._log_checkpoints(path)
            self.tracker.set_tags({"rgan.sweep.outcome": "completed"})
        flush = getattr(self.tracker, "flush", None)
        if flush is not None:
            flush(FLUSH_TIMEOUT_S)

    def run(self) -> None:
        from rgan_dist.engine.loop import TrainingDiverged

        trainer, tracker = self.trainer, self.tracker
        assert trainer is not None and tracker is not None
        status, outcome = "FAILED", "error"
        try:
            result = trainer.fit()
            if not result.interrupted and self.reporter.last_step != trainer.step:
                trainer.evaluate()  # the final step was not an evaluation step: judge the end too
            if result.interrupted:
                status, outcome = "KILLED", "interrupted"
            else:
                status, outcome = "FINISHED", "completed"
                if not self.finished:
                    self._log_checkpoints(result.checkpoint)
        except TrainingDiverged as e:
            # Deterministic: a retry from the last checkpoint would diverge again. Report it as the worst
            # possible FID (PBT then replaces the trial, ASHA stops it) and end the trial normally.
            outcome = "diverged"
            print(f"rgan sweep: trial {self.trial_id}: {e}", file=sys.stderr, flush=True)
            self.reporter.report(trainer, {"fid": math.inf}, diverged=1)
        except SystemExit as e:
            # `tune.report` ends a trial that Tune stopped with SystemExit(0): at its last step (the stop
            # criterion), or early (ASHA), or paused to restart from another trial's checkpoint (PBT).
            if e.code not in (0, None):
                raise
            status, outcome = "FINISHED", "completed" if self.finished else "stopped early"
            raise
        finally:
            tracker.set_tags({"rgan.sweep.outcome": outcome})
            tracker.close(status)
            self.strategy.close()


def _restore_folder(checkpoint: Any) -> contextlib.AbstractContextManager[str | None]:
    return checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None)


def trial_main(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function of every trial."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if setup.workers > 1:
        _run_distributed_trial(config, setup, trial_id)
        return
    with _restore_folder(tune.get_checkpoint()) as folder:
        cfg = setup.trial_config(trial_id, config, folder)
        job = TrialRun(cfg, setup, trial_id, Reporter(tune.report, tune.Checkpoint), describe_trial(config))
    job.run()


def _worker_main(loop_config: dict[str, Any]) -> None:
    """Each Ray Train worker of a multi-worker trial (DDP/DeepSpeed; the process group is Ray's)."""
    import ray.train

    setup: TrialSetup = loop_config["setup"]
    trial_id: str = loop_config["trial_id"]
    config: dict[str, Any] = loop_config["config"]
    with _restore_folder(ray.train.get_checkpoint()) as folder:
        cfg = setup.trial_config(trial_id, config, folder)
        job = TrialRun(cfg, setup, trial_id, Reporter(ray.train.report, ray.train.Checkpoint), describe_trial(config))
    job.run()


def _run_distributed_trial(config: dict[str, Any], setup: TrialSetup, trial_id: str) -> None:
    """A TorchTrainer per trial (Train V2): workers report through `ray.train.report`, and the
    TuneReportCallback forwards rank 0's metrics to this trial. Worker failures are retried by Ray Train
    from its latest checkpoint; a re-run of this function (Tune's own retry) finds the same Train run by
    name and storage and continues it."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = {"CPU": setup.cpus_per_worker}
    if setup.gpus_per_worker:
        resources["GPU"] = setup.gpus_per_worker
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"setup": setup, "trial_id": trial_id, "config": config},
        scaling_config=ray.train.ScalingConfig(num_workers=setup.workers, use_gpu=setup.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}", storage_path=setup.train_storage,
            failure_config=ray.train.FailureConfig(max_failures=setup.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
