"""Where metrics go. Non-main ranks get the null `Tracker`, so the loop never asks `if rank == 0`.

`JsonlTracker` appends one JSON object per logged step to `<run.out_dir>/metrics.jsonl`: the record
that survives any tracking-server failure (the MLflow tracker keeps writing it as its fallback).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Tracker:
    """Does nothing: the tracker of every rank but 0, and of runs with tracking disabled."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class JsonlTracker(Tracker):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
