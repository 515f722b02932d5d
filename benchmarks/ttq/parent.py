"""The MLflow parent run of a benchmark, kept across resumed invocations; each run is a nested child."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from benchmarks.ttq.results import Results


class ParentRun:
    """The benchmark's MLflow run, reused by a resumed invocation while it is active in the same store; any
    MLflow failure prints one warning and the benchmark goes on without it."""

    def __init__(self, results: Results, uri: str, artifacts: str | None, experiment: str,
                 params: dict[str, Any]) -> None:
        self.run_id: str | None = None
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Param

            from rgan_dist.run_info import git_state, package_versions
            from rgan_dist.tracking import bound_http_retries, experiment_id

            bound_http_retries()
            self.client = MlflowClient(tracking_uri=uri)
            exp = experiment_id(self.client, experiment, artifacts)
            previous = (results.data.get("mlflow") or {})
            if previous.get("tracking_uri") == uri and previous.get("parent_run_id"):
                with contextlib.suppress(Exception):
                    run = self.client.get_run(previous["parent_run_id"])
                    if run.info.lifecycle_stage == "active":
                        self.run_id = run.info.run_id
                        self.client.update_run(self.run_id, status="RUNNING")
            if self.run_id is None:
                tags = {"rgan.benchmark": "time_to_quality", "mlflow.source.name": "benchmarks/time_to_quality.py",
                        "mlflow.source.type": "JOB", **git_state(),
                        **{f"version.{k}": v for k, v in package_versions().items()}}
                self.run_id = self.client.create_run(exp, run_name=f"time-to-quality-{params['profile']}",
                                                     tags=tags).info.run_id
                self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                                      synchronous=True)
            self.experiment_id = exp
            results.data["mlflow"] = {"tracking_uri": uri, "parent_run_id": self.run_id, "experiment": experiment}
            print(f"ttq: MLflow parent run {self.run_id} in experiment {experiment!r} ({uri})", flush=True)
        except Exception as e:  # the benchmark must not depend on the tracking store
            print(f"ttq: warning: MLflow parent run unavailable ({type(e).__name__}: {e}); runs are not nested",
                  file=sys.stderr, flush=True)
            self.run_id = None

    def finish(self, files: list[Path], status: str) -> None:
        if self.run_id is None:
            return
        try:
            children = self.client.search_runs([self.experiment_id],
                                               filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'")
            for child in children:  # a run whose process was killed never closed its MLflow run
                if child.info.status == "RUNNING":
                    self.client.set_terminated(child.info.run_id, "KILLED")
            for path in files:
                self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            print(f"ttq: warning: could not finish the MLflow parent run ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)
