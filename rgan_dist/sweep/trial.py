"""Running one trial: the engine's one run lifecycle (`engine.loop.train`) with the trial's callbacks
(`TrialHooks`: a report to Tune, with a checkpoint, at every evaluation; PBT's hyperparameters; the test
fault), as one process or as the workers of a Ray Train TorchTrainer. No Trainer subclass: the trial uses
only the Trainer's public hooks, so the loop can change without the sweep following it."""

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
from rgan_dist.engine.hooks import Callback
from rgan_dist.errors import UsageError
from rgan_dist.sweep.space import describe_trial, trial_index, trial_overrides, trial_run_name

if TYPE_CHECKING:
    from rgan_dist.engine.loop import Trainer, TrainResult

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
        from rgan_dist.sweep.spec import resolve_trial_paths

        # A cluster sweep leaves relative paths (a DeepSpeed JSON of configs/) to this node's checkout.
        return resolve_trial_paths(config_from_dict(self.base, where=f"trial {trial_id}",
                                                    values={**overrides, **plumbing}))


class FaultOnce:
    """`RGAN_SWEEP_FAULT_INJECT=raise@K[:trialN]`: fail as the trial is about to run step K, once per trial.

    A test hook, not a feature (like the engine's `RGAN_FAULT_INJECT`, which fires on every attempt and so
    cannot show a retried trial completing). It fires from the callbacks that end step K-1 (or start the
    run), so step K is never logged by the failing attempt. "Once" is kept by a marker file in the trial's
    output folder, so the retry that resumes from the trial's checkpoint runs through step K."""

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

    def before_step(self, step: int) -> None:
        if self.step is not None and step == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"{time.time()}\n")
            raise RuntimeError(f"{SWEEP_FAULT_ENV}: injected failure at step {step}")


class Reporter:
    """Hands each FID evaluation to Tune (or Ray Train), with a Ray checkpoint holding our checkpoint.

    `report_fn(metrics, checkpoint=...)` is `ray.tune.report` in a one-process trial and `ray.train.report`
    in the workers of a multi-worker trial (every worker calls it; rank 0 attaches the checkpoint)."""

    def __init__(self, report_fn: Callable[..., None], checkpoint_cls: Any, *, trial_id: str = "") -> None:
        self.report_fn = report_fn
        self.trial_id = trial_id
        self.checkpoint_cls = checkpoint_cls
        self.restored_from = 0  # the step the Trainer resumed at (set at on_start)
        self.last_step: int | None = None
        self.run_id = ""
        self.before_send: Callable[[Trainer, Path | None], None] | None = None

    def report(self, trainer: Trainer, result: dict[str, float], **extra: Any) -> None:
        path = trainer.save_checkpoint()  # a collective: every rank, same step
        if self.before_send is not None:
            self.before_send(trainer, path)
        fid = float(result.get("fid", math.inf))
        metrics = {"fid": fid, "best_fid": float(trainer.best_fid), "step": int(trainer.step),
                   "restored_from_step": int(self.restored_from), "mlflow_run_id": self.run_id,
                   "node_id": _node_id(), **extra}
        for key in ("kid", "kid_std", "eval_seconds"):
            if result.get(key) is not None:
                metrics[key] = float(result[key])
        self.last_step = trainer.step
        if path is None:  # not rank 0
            self.report_fn(metrics)
            return
        with _staged(path) as folder:
            self.report_fn(metrics, checkpoint=self.checkpoint_cls.from_directory(str(folder)))


def _node_id() -> str:
    """The Ray node this trial runs on (the results table's `node`: where to look for a trial's logs)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A folder holding just this checkpoint (its .pt, its digest, a DeepSpeed sidecar if any, and a `latest`
    pointer), hard-linked where possible: what Ray copies to its storage as the trial's checkpoint."""
    from rgan_dist.checkpoint import digest_path

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
        if digest_path(path).is_file():  # so the restored trial's load is verified, like any resume
            link(str(digest_path(path)), str(folder / digest_path(path).name))
        sidecar = path.with_suffix(".ds")
        if sidecar.is_dir():
            shutil.copytree(sidecar, folder / sidecar.name, copy_function=link)
        (folder / "latest").write_text(path.name)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class TrialHooks(Callback):
    """The trial's callbacks on the engine's Trainer (see `engine.loop.Callback`).

    - on_start: the Trainer has resumed from the checkpoint, so Ray's copy of it is released; a PBT
      exploit's own lr/betas replace those the checkpoint's optimizers carry.
    - on_eval: every evaluation goes to Tune with a checkpoint (`Reporter`).
    - on_end: a run that did not end on an evaluation step is judged once more; a diverged run reports
      the worst FID; the run's outcome is tagged in MLflow before `train()` closes it."""

    def __init__(self, cfg: Config, reporter: Reporter, tracker: Any, fault: FaultOnce,
                 release: Callable[[], None]) -> None:
        self.cfg, self.reporter, self.tracker, self.fault, self.release = cfg, reporter, tracker, fault, release
        self.finished = False  # the last step's report is prepared (see `_before_send`)
        reporter.before_send = self._before_send

    def on_start(self, trainer: Trainer) -> None:
        self.release()
        self.reporter.restored_from = trainer.step
        self.tracker.set_tags({"rgan.model": trainer.model_summary})
        if self.cfg.checkpoint.resume:
            # A PBT exploit restarts this trial from another trial's checkpoint, whose optimizers carry that
            # trial's values: the ones Tune gave this trial must win.
            t = self.cfg.train
            for phase, lr in (("g", t.lr_g), ("d", t.lr_d)):
                trainer.strategy.set_hparams(phase, lr=lr, betas=(t.betas[0], t.betas[1]))
        self.fault.before_step(trainer.step + 1)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.fault.before_step(step + 1)

    def on_eval(self, trainer: Trainer, step: int, results: dict[str, float]) -> None:
        self.reporter.report(trainer, results)

    def on_end(self, trainer: Trainer, result: TrainResult | None, error: BaseException | None) -> None:
        from rgan_dist.engine.loop import TrainingDiverged

        outcome = "error"
        try:
            if isinstance(error, TrainingDiverged):
                # Deterministic: a retry from the last checkpoint would diverge again. Report it as the worst
                # possible FID (PBT then replaces the trial, ASHA stops it) and end the trial normally.
                outcome = "diverged"
                print(f"rgan sweep: trial {self.reporter.trial_id}: {error}", file=sys.stderr, flush=True)
                self.reporter.report(trainer, {"fid": math.inf}, diverged=1)
            elif isinstance(error, SystemExit) and error.code in (0, None):
                # `tune.report` ends a trial that Tune stopped with SystemExit(0): at its last step (the stop
                # criterion), or early (ASHA), or paused to restart from another trial's checkpoint (PBT).
                outcome = "completed" if self.finished else "stopped early"
            elif result is not None and result.interrupted:
                outcome = "interrupted"
            elif result is not None:
                outcome = "completed"
                if self.reporter.last_step != trainer.step:
                    trainer.evaluate()  # the final step was not an evaluation step: judge the end too
        finally:
            self.tracker.set_tags({"rgan.sweep.outcome": outcome})

    def _before_send(self, trainer: Trainer, path: Path | None) -> None:
        """Tune may end this process as soon as it has a report (the last one: the stop criterion; or one a
        scheduler stops the trial at), without waiting for this thread: what the run still owes MLflow
        (the last step's samples and checkpoints, queued metrics) is done before the report leaves."""
        if trainer.step >= self.cfg.train.steps and not self.finished:
            self.finished = True
            if not trainer.samples or not trainer.samples[-1].stem.endswith(f"{trainer.step:07d}"):
                trainer.save_samples()
            if path is not None:
                self.tracker.log_checkpoint(path, "final")
            self.tracker.log_checkpoint(trainer.ckpt.dir / "best.pt", "best")
            if path is not None:  # the final G as a logged model, as `rgan train` logs it (rgan_dist.mlflow_model)
                from rgan_dist.mlflow_model import log_final_generator

                log_final_generator(self.tracker, path, self.cfg.out_dir, trainer.step)
            self.tracker.set_tags({"rgan.sweep.outcome": "completed"})
        flush = getattr(self.tracker, "flush", None)
        flushed = flush is None or flush(FLUSH_TIMEOUT_S)
        # The tracker waits only so long for its run at start (a busy store creates it later, on its worker
        # thread): the id a report carries is read now, or the sweep could not find the trial's run.
        self.reporter.run_id = str(getattr(self.tracker, "run_id", "") or "")
        if not flushed:
            # Not silent: Tune may end this process once it has the report, taking what is queued with it
            # (the final generator's logged model is a call, not a record the spool keeps).
            print(f"rgan sweep: warning: trial {self.reporter.trial_id}: MLflow uploads still pending after "
                  f"{FLUSH_TIMEOUT_S:.0f}s; reporting to Tune anyway, so its run may miss its last records "
                  "or its final generator model (a slow tracking server?)", file=sys.stderr, flush=True)


def run_trial(cfg: Config, setup: TrialSetup, reporter: Reporter, describe: dict[str, str],
              release: Callable[[], None] = lambda: None) -> None:
    """One trial's training through `engine.loop.train`, in an MLflow run nested under the sweep's parent.

    The tracker is made here, not by the Trainer, because the child run must carry the sweep's tags
    (`mlflow.parentRunId` among them) from its creation."""
    from rgan_dist.engine import make_strategy
    from rgan_dist.engine.loop import TrainingDiverged, train
    from rgan_dist.run_info import run_tags
    from rgan_dist.tracking import make_tracker

    s = make_strategy(cfg)
    try:
        fault = FaultOnce(setup.fault, reporter.trial_id, cfg.out_dir, s.rank)
        extra = {"rgan.sweep": setup.sweep, "rgan.sweep.trial_id": reporter.trial_id,
                 **{f"rgan.sweep.{k}": v for k, v in describe.items()}, "mlflow.source.name": "rgan sweep",
                 # which copy of the code ran: on a cluster, the checkout the driver shipped (runtime_env)
                 "rgan.sweep.code_dir": str(Path(__file__).resolve().parent.parent.parent),
                 "rgan.sweep.node_id": _node_id()}
        if setup.parent_run_id:
            extra["mlflow.parentRunId"] = setup.parent_run_id
        if setup.paper:
            extra["rgan.paper_table"] = setup.paper
        tags = run_tags(cfg, strategy=s.name, world_size=s.world_size, device=s.device, extra=extra) \
            if s.is_main else None
        tracker = make_tracker(cfg, s.is_main, tags=tags)
    except BaseException:
        s.close()
        raise
    try:
        train(cfg, s, callbacks=[TrialHooks(cfg, reporter, tracker, fault, release)], tracker=tracker)
    except TrainingDiverged:
        pass  # reported by on_end as the worst FID; the trial ends normally
    finally:
        tracker.close("FAILED")  # a no-op once `train()` closed it; else the Trainer could not be built


def _run(setup: TrialSetup, trial_id: str, config: dict[str, Any], checkpoint: Any, report_fn: Callable[..., None],
         checkpoint_cls: Any) -> None:
    """A trial (or one worker of it) from Tune's sampled `config`, resuming from Ray's `checkpoint` if any.
    Ray's checkpoint folder stays open only until the Trainer has loaded it (`TrialHooks.on_start`)."""
    with contextlib.ExitStack() as ray_folder:
        folder = ray_folder.enter_context(checkpoint.as_directory()) if checkpoint is not None else None
        cfg = setup.trial_config(trial_id, config, folder)
        reporter = Reporter(report_fn, checkpoint_cls, trial_id=trial_id)
        run_trial(cfg, setup, reporter, describe_trial(config), release=ray_folder.close)


def trial_main(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function of every trial."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if setup.workers > 1:
        _run_distributed_trial(config, setup, trial_id)
        return
    _run(setup, trial_id, config, tune.get_checkpoint(), tune.report, tune.Checkpoint)


def _worker_main(loop_config: dict[str, Any]) -> None:
    """Each Ray Train worker of a multi-worker trial (DDP/DeepSpeed; the process group is Ray's)."""
    import ray.train

    _run(loop_config["setup"], loop_config["trial_id"], loop_config["config"], ray.train.get_checkpoint(),
         ray.train.report, ray.train.Checkpoint)


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
