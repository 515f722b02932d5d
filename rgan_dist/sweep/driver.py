"""The driver: one Ray Tune run for a checked sweep (or its continuation), then the results table."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rgan_dist.errors import UsageError
from rgan_dist.sweep.parent import ParentRun
from rgan_dist.sweep.results import TrialRow, collect_rows, write_results
from rgan_dist.sweep.space import make_scheduler, param_space
from rgan_dist.sweep.spec import REPO_ROOT, SweepConfig, cluster_storage_error
from rgan_dist.sweep.trial import SWEEP_FAULT_ENV, TrialSetup, trial_main

TRIAL_DRIVER_CPUS = 0.01  # the Tune function of a multi-worker trial only waits on its TorchTrainer
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray Jobs for the entrypoint: the job's runtime_env


@dataclass
class SweepResult:
    rows: list[TrialRow]
    table: str
    files: list[Path]
    experiment_path: str
    parent_run_id: str | None
    results: Any = None  # Tune's ResultGrid


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def code_runtime_env(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The Ray `runtime_env` that ships this checkout to every node, so trials import the submitter's code,
    not whatever version the nodes' image holds. None when there is nothing to add: inside a Ray job that
    already carries a working_dir (`ray job submit --working-dir .`: this process runs from that copy), or
    when the package is installed without its source tree. What is left out (.git, data, venvs, run
    outputs) is listed in .gitignore and .rayignore, which `ray job submit` reads too."""
    environ = os.environ if environ is None else environ
    job = json.loads(environ.get(JOB_CONFIG_ENV) or "{}")
    if (job.get("runtime_env") or {}).get("working_dir"):
        return None
    if not (REPO_ROOT / "pyproject.toml").is_file() or not (REPO_ROOT / "rgan_dist").is_dir():
        return None
    return {"working_dir": str(REPO_ROOT)}


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        env = code_runtime_env()
        print(f"rgan sweep: trials run the code in {REPO_ROOT}"
              + (" (shipped to the cluster as the runtime_env working_dir)" if env else ""), flush=True)
        ray.init(address=address, runtime_env=env)
    else:
        ray.init(num_cpus=num_cpus)


def _cluster_uri(uri: str, shared_folder: str = "") -> str:
    """On a cluster, trials run on other nodes: an MLflow server named `localhost` is this (the head) node,
    so they get its address instead; a SQLite file is local to each node, which splits the sweep's runs,
    unless it lies in the sweep's shared storage folder."""
    import ray

    m = re.match(r"^(https?://)(localhost|127\.0\.0\.1)(?=[:/]|$)(.*)$", uri)
    if m:
        return f"{m.group(1)}{ray.util.get_node_ip_address()}{m.group(3)}"
    shared = shared_folder.rstrip("/") + "/"
    if uri.startswith("sqlite:") and not (shared_folder and uri.removeprefix("sqlite:///").startswith(shared)):
        print(f"rgan sweep: warning: MLflow store {uri} is a file on this node; trials on other nodes cannot log "
              f"to it. Put it in the sweep's storage folder (leave tracking.mlflow_uri empty), or start an MLflow "
              f"server (the cluster YAMLs do, on port 5000) and pass tracking.mlflow_uri=http://localhost:5000",
              file=sys.stderr, flush=True)
    return uri


class TrialOutput:
    """Waits for the trials' console lines to stop before the final table is printed.

    Ray forwards each worker's stdout/stderr to the driver asynchronously (the log monitor tails the workers'
    files and publishes batches), so lines of finished trials kept arriving after `tuner.fit()` returned and
    were printed under the results table. This listens on Ray's own dispatcher of those batches and, once
    the sweep is done, waits until none has come for `quiet_s` (at most `limit_s`)."""

    NAME = "rgan_trial_output"

    def __init__(self, quiet_s: float = 2.0, limit_s: float = 20.0) -> None:
        import time

        self.quiet_s, self.limit_s = quiet_s, limit_s
        self.last = time.monotonic()
        self._dispatcher: Any = None

    def _seen(self, _batch: Any) -> None:
        import time

        self.last = time.monotonic()

    def start(self) -> TrialOutput:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        self._dispatcher = dispatcher
        dispatcher.add_handler(self.NAME, self._seen)
        return self

    def settle(self, limit_s: float | None = None) -> float:
        """Block until the trials' output has been quiet for `quiet_s` (at most `limit_s`, default the
        instance's); returns the seconds waited. Stops listening."""
        import time

        limit = self.limit_s if limit_s is None else limit_s
        t0 = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                left = self.quiet_s - (now - self.last)
                if left <= 0 or now - t0 >= limit:
                    return now - t0
                time.sleep(min(left, 0.1))
        finally:
            if self._dispatcher is not None:
                self._dispatcher.remove_handler(self.NAME)
                self._dispatcher = None


def copy_to_storage(files: list[Path], spec: SweepConfig) -> list[str]:
    """With an object store as `storage` (s3://...), the results table is also put beside Ray's experiment
    there: the driver's own folder may be a Ray job's temporary copy of the checkout. A folder `storage`
    already holds it (out_dir is in it)."""
    if not spec.storage or spec.shared_folder:
        return []
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(spec.experiment_path)
    fs.create_dir(root, recursive=True)
    for path in files:
        pyarrow.fs.copy_files(str(path), f"{root}/{path.name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
    return [f"{spec.experiment_path.rstrip('/')}/{path.name}" for path in files]


def run_sweep(spec: SweepConfig, *, address: str | None = None, num_cpus: int | None = None, resume: bool = False,
              verbose: int = 1) -> SweepResult:
    """Run (or, with `resume`, continue) the sweep and write its table. Uses the Ray instance this process
    is already connected to, else connects to `address` (`auto`: the cluster this node belongs to), else
    starts a local one with `num_cpus`."""
    from ray import tune

    from rgan_dist.tracking import resolve_store

    exp_path = spec.experiment_path
    if address and not spec.storage:
        raise UsageError(cluster_storage_error(spec.path))
    _init_ray(address, num_cpus)
    can_restore = tune.Tuner.can_restore(exp_path)
    if resume and not can_restore:
        raise UsageError(f"rgan sweep --resume: no sweep to continue at {exp_path}; run it without --resume")
    if not resume and can_restore:
        raise UsageError(f"sweep {spec.name!r} already ran in {exp_path}: pass --resume to continue it, or give "
                         f"it another name (--name) to start afresh")
    cfg = spec.base_config
    parent: ParentRun | None = None
    uri = ""
    if cfg.tracking.enabled:
        # On a cluster the default store (a SQLite file, artifacts beside it) is in the shared folder.
        uri, artifacts = resolve_store(cfg.tracking.mlflow_uri, (spec.shared_folder or None) if address else None,
                                       artifact_root=cfg.tracking.artifact_root)
        if address:
            uri = _cluster_uri(uri, spec.shared_folder)
        try:
            parent = ParentRun(spec, uri, artifacts, resume=resume)
        except Exception as e:  # tracking must never stop a sweep
            print(f"rgan sweep: warning: MLflow at {uri} failed ({type(e).__name__}: {e}); trials still log to "
                  f"their metrics.jsonl", file=sys.stderr, flush=True)
    res = spec.resources
    setup = TrialSetup(sweep=spec.name, base=cfg.to_dict(as_given=True), out_dir=spec.out_dir, mlflow_uri=uri,
                       experiment=cfg.tracking.experiment, parent_run_id=parent.run_id if parent else None,
                       paper=spec.paper, workers=res.workers, cpus_per_worker=res.cpus_per_worker,
                       gpus_per_worker=res.gpus_per_worker, max_failures=spec.max_failures,
                       train_storage=f"{exp_path.rstrip('/')}/train",
                       fault=os.environ.get(SWEEP_FAULT_ENV, ""))
    if res.workers > 1:
        # The trial function only drives a TorchTrainer, whose workers hold the resources (Ray refuses a
        # request of nothing at all, hence a sliver of a CPU).
        trial_resources: dict[str, float] = {"cpu": TRIAL_DRIVER_CPUS}
    else:
        trial_resources = {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}
    trainable = tune.with_resources(tune.with_parameters(trial_main, setup=setup), trial_resources)
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric="fid", mode="min", scheduler=make_scheduler(spec),
                                        num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent_trials or None,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=spec.name if spec.storage else spec.out_path.name, storage_path=spec.storage_path,
                # A trial's last report ends it before any scheduler sees it (PBT would otherwise still
                # exploit at the final step, and ASHA stops everything at max_t anyway).
                stop={"step": cfg.train.steps},
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # PBT restores trials from other trials' checkpoints, possibly after those reported again:
                # keep them all there; elsewhere a trial only ever resumes from its own latest.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if spec.scheduler.name == "pbt" else 2),
                verbose=verbose),
        )
    status = "FAILED"
    results = None
    rows: list[TrialRow] = []
    files: list[Path] = []
    table = ""
    output = TrialOutput().start()
    try:
        results = tuner.fit()
        output.settle()
        rows = collect_rows(results, spec)
        table, files = write_results(rows, spec)
        for dest in copy_to_storage(files, spec):
            print(f"rgan sweep: copied to {dest}", flush=True)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        # Settled already after a fit; after a failure the trials' last lines come before the error; Ctrl-C waits not.
        output.settle(0.0 if status == "KILLED" else None)
        if parent is not None:
            try:
                parent.finish(rows, files, status)
            except Exception as e:
                print(f"rgan sweep: warning: could not finish the MLflow parent run ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)
    return SweepResult(rows=rows, table=table, files=files, experiment_path=exp_path,
                       parent_run_id=parent.run_id if parent else None, results=results)
