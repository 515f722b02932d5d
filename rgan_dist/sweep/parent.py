"""The sweep's MLflow parent run, under which every trial's run nests."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rgan_dist.config import dump_config
from rgan_dist.tracking import mlflow_name

if TYPE_CHECKING:
    from rgan_dist.sweep.results import TrialRow
    from rgan_dist.sweep.spec import SweepConfig

STATE_FILE = "sweep.json"


class ParentRun:
    """The sweep's MLflow run; trials nest under it (`mlflow.parentRunId`). Any MLflow failure here
    prints one warning and turns the parent off: the sweep itself must not depend on the tracking store."""

    def __init__(self, spec: SweepConfig, uri: str, artifact_root: str | None, *, resume: bool) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from rgan_dist.run_info import git_state, package_versions
        from rgan_dist.tracking import bound_http_retries, experiment_id

        bound_http_retries()
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = spec.base_config.tracking.experiment
        self.sweep = spec.name
        self.state = spec.out_path / STATE_FILE
        self.experiment_id = exp_id = experiment_id(self.client, self.experiment, artifact_root)
        previous = self._previous() if resume else None
        if previous:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
        else:
            tags = {"rgan.sweep": spec.name, "mlflow.source.name": "rgan sweep", "mlflow.source.type": "JOB",
                    "rgan.sweep.scheduler": spec.scheduler.name, **git_state(),
                    # the parent's description in the UI; each trial's run describes its own variant in words
                    "mlflow.note.content": f"Sweep {spec.name}: {spec.num_samples} sample(s) of "
                                           f"{json.dumps(spec.space, default=str)[:3000]} over {spec.base}, "
                                           f"scheduler {spec.scheduler.name}. Compare the trials in the chart "
                                           f"view: eval/fid against Step, or against eval/elapsed_s (x-axis "
                                           f"Metric) for FID over wall-clock time.",
                    **{f"version.{k}": v for k, v in package_versions().items()}}
            if spec.paper:
                tags["rgan.paper_table"] = spec.paper
            self.run_id = self.client.create_run(exp_id, run_name=spec.name, tags=tags).info.run_id
            params = {"sweep.name": spec.name, "sweep.base": str(spec.base), "sweep.scheduler": spec.scheduler.name,
                      "sweep.num_samples": spec.num_samples, "sweep.max_failures": spec.max_failures,
                      "sweep.workers_per_trial": spec.resources.workers,
                      "sweep.space": json.dumps(spec.space, default=str)[:6000],
                      **{f"sweep.overrides.{k}": json.dumps(v) if isinstance(v, list | dict) else v
                         for k, v in spec.overrides.items()}}
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                                  synchronous=True)
            self.client.log_artifact(self.run_id, str(spec.path))
            spec.out_path.mkdir(parents=True, exist_ok=True)
            base = spec.out_path / "base_config.yaml"
            base.write_text(dump_config(spec.base_config))
            self.client.log_artifact(self.run_id, str(base))
        spec.out_path.mkdir(parents=True, exist_ok=True)
        self.state.write_text(json.dumps({"tracking_uri": uri, "parent_run_id": self.run_id,
                                          "experiment_id": exp_id}) + "\n")
        print(f"rgan sweep: MLflow parent run {self.run_id} in experiment {self.experiment!r} ({uri})", flush=True)

    def _previous(self) -> str | None:
        from rgan_dist.tracking import recorded_active_run

        return recorded_active_run(self.client, self.state, self.uri, "parent_run_id")

    def children(self) -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
                                       max_results=10_000)

    def _mark_best_model(self, best: TrialRow) -> None:
        """Tag the best trial's run and its logged generator (`rgan.sweep.best` = the sweep's name), so the
        experiment's Models tab and the runs table say which model won. A trial stopped early has no model."""
        from rgan_dist.mlflow_model import BEST_TAG

        if not best.mlflow_run_id:
            if best.outcome == "completed":  # its tracker never got a run (the store was unreachable)
                print(f"rgan sweep: warning: the best trial {best.trial_id} reported no MLflow run, so neither a run "
                      "nor a model is tagged best; its trial log says why", file=sys.stderr, flush=True)
            return
        run = self.client.get_run(best.mlflow_run_id)
        self.client.set_tag(best.mlflow_run_id, BEST_TAG, self.sweep)
        model_id = run.data.tags.get("rgan.generator_model_id")
        if model_id:
            self.client.set_logged_model_tags(model_id, {BEST_TAG: self.sweep})
        elif best.outcome == "completed":  # it should have one: its upload failed or was cut short
            print(f"rgan sweep: warning: the best trial {best.trial_id} (MLflow run {best.mlflow_run_id}) has no "
                  "logged generator model, so only its run is tagged best (its upload failed or was cut short; "
                  "the trial's log says which); its generator: rgan export --checkpoint "
                  f"{self.state.parent / 'trials' / best.trial_id} --out G.safetensors", file=sys.stderr, flush=True)

    def finish(self, rows: list[TrialRow], files: list[Path], status: str) -> None:
        """Tag each child with its outcome, close children a killed process left RUNNING, log the table."""
        by_trial = {r.trial_id: r for r in rows}
        for child in self.children():
            row = by_trial.get(child.data.tags.get("rgan.sweep.trial_id", ""))
            if row is not None:
                self.client.set_tag(child.info.run_id, "rgan.sweep.outcome", row.outcome)
                self.client.set_tag(child.info.run_id, "rgan.sweep.rank", str(row.rank))
            if child.info.status == "RUNNING":
                # Its process ended before it could close the run: Tune ends a stopped trial's actor
                # without waiting for it, and a killed driver takes its trials along.
                done = row is not None and row.outcome in ("completed", "stopped early")
                self.client.set_terminated(child.info.run_id, "FINISHED" if done else "KILLED")
        finite = [r.best_fid for r in rows if r.best_fid is not None and math.isfinite(r.best_fid)]
        if finite:
            self.client.log_metric(self.run_id, mlflow_name("best_fid"), min(finite))
            best = min((r for r in rows if r.best_fid in finite), key=lambda r: r.best_fid)
            self.client.set_tag(self.run_id, "rgan.sweep.best_trial", best.trial_id)
            self.client.set_tag(self.run_id, "rgan.sweep.best_run", best.name)
            self._mark_best_model(best)
        self.client.log_metric(self.run_id, "sweep/trials", len(rows))
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)
