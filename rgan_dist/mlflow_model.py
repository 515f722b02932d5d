"""The final generator as an MLflow 3 logged model of the run, so a run in the UI holds something a user can load
and sample (the runs table's Models column and the experiment's Models tab list it):

    G = mlflow.pyfunc.load_model("runs:/<run_id>/generator")      # or "models:/<model_id>"
    images = G.predict(np.random.randn(8, z_dim).astype("float32"))   # [8, C, R, R] in [-1, 1]

The model is logged at the run's final step, so MLflow links the metrics of that step (the final FID among
them, when the run evaluated there) to the model: its page shows them.

It is a pyfunc model (signature z [B, z_dim] float32 -> images [B, C, R, R] float32) around the exported
safetensors file (`rgan_dist.export`), which sits in the model's `artifacts/` for users who want the file
itself. It is a "model from code" (`mlflow_generator.py` builds it), so the folder holds no pickle. Loading
needs rgan-dist installed (the wrapper class is this module's), no network and no trainer.

Cost: at the end of a run with tracking enabled, rank 0 loads the final checkpoint, recalibrates the EMA
generator's BatchNorm statistics (as every evaluation does) and writes a few files; the upload goes through
the tracker's queue like any artifact, so a slow or dead server never holds the job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np

if TYPE_CHECKING:
    from rgan_dist.tracking import Tracker

ARTIFACT_PATH = "generator"  # runs:/<run_id>/generator
EXPORT_DIR = "generator"  # in run.out_dir: the exported file and the MLflow model folder
CODE = Path(__file__).with_name("mlflow_generator.py")  # what MLflow runs to load the model: no pickle
BEST_TAG = "rgan.sweep.best"  # on the run and logged model of a sweep's best trial (rgan_dist.sweep.parent)
_LOGGED: weakref.WeakSet[Tracker] = weakref.WeakSet()  # trackers whose run has its generator logged


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: `predict(z)` -> images; G is built in `load_context` from the safetensors artifact."""

    def load_context(self, context: Any) -> None:
        from rgan_dist.export import load_generator

        self.G = load_generator(context.artifacts["generator"])

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        z = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.G(z).float().cpu().numpy()


def signature(metadata: dict[str, str]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    z, c, r = (int(metadata[k]) for k in ("z_dim", "channels", "resolution"))
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, z))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, r, r))]))


def save_generator_model(generator_file: Path, metadata: dict[str, str], path: Path) -> Path:
    """Write the pyfunc model folder at `path` (replaced if present) around `generator_file`."""
    if path.exists():
        shutil.rmtree(path)
    with warnings.catch_warnings(), _no_progress_bar():
        warnings.filterwarnings("ignore", message=".*input example.*")  # z ~ N(0, I) needs no example
        mlflow.pyfunc.save_model(
            str(path), python_model=str(CODE), artifacts={"generator": str(generator_file)},
            signature=signature(metadata), metadata={"rgan": metadata},
            # explicit, so MLflow does not start a subprocess to infer them
            pip_requirements=["rgan-dist", "torch", "safetensors", "numpy"])
    return path


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """save_model copies the weights in with a progress bar; in a training log that is noise."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _log_model(client: Any, run_id: str, exported: Path, metadata: dict[str, str], uri: str, step: int) -> str:
    """Log the pyfunc model around `exported` as the logged model `generator` of run `run_id` at `step`; link the
    run's latest evaluation results to it; return its model id."""
    from mlflow.entities import Metric
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # Created here, in the run's experiment (Model.log would pick the process's default experiment), then filled
    # by Model.log (what pyfunc.log_model calls, without its run_id), which talks to the global tracking URI: this
    # run's store, for this call only.
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=ARTIFACT_PATH, source_run_id=run_id,
                                       params=dict(run.data.params), model_type="generator")
    with _use_tracking_uri(uri), warnings.catch_warnings(), _no_progress_bar():
        warnings.filterwarnings("ignore", message=".*input example.*")
        info = Model.log(None, name=ARTIFACT_PATH, flavor=mlflow.pyfunc, flavor_name="pyfunc.ModelFromCode",
                         model_id=model.model_id, run_id=run_id, step=step, python_model=str(CODE),
                         artifacts={"generator": str(exported)},
                         signature=signature(metadata), metadata={"rgan": metadata},
                         pip_requirements=["rgan-dist", "torch", "safetensors", "numpy"])
    # Model.log linked the metrics of `step`; the last evaluation may be older (eval.every does not divide
    # train.steps): its values are the model's too
    latest = [client.get_metric_history(run_id, k)[-1:] for k in run.data.metrics if k.startswith("eval/")]
    older = [Metric(m.key, m.value, m.timestamp, m.step, model_id=info.model_id, run_id=run_id)
             for ms in latest for m in ms if m.step != step]
    if older:
        client.log_batch(run_id, metrics=older, synchronous=True)
    return info.model_id


def log_final_generator(tracker: Tracker, checkpoint: Path | None, out_dir: Path, step: int = 0) -> Path | None:
    """Export the generator of `checkpoint` to `<out_dir>/generator/G.safetensors`, wrap it as a pyfunc model
    and log that as the logged model `generator` of `tracker`'s MLflow run at `step` (the run's final step).
    Only an MLflow tracker that still works (rank 0, tracking enabled) does anything; returns the local model
    folder or None. A failure here is one warning line: the run itself has finished by now."""
    from rgan_dist.tracking import MlflowTracker

    if not isinstance(tracker, MlflowTracker) or tracker.failed or checkpoint is None or tracker in _LOGGED:
        return None  # (a sweep trial logs it before its last report; `train()` may come to it again)
    _LOGGED.add(tracker)
    from rgan_dist.export import export_generator, load_trained

    folder = out_dir / EXPORT_DIR
    try:
        trained = load_trained(checkpoint)
        exported = export_generator(trained, folder / "G.safetensors")
        final = save_generator_model(exported, trained.metadata, folder / "mlflow-model")
    except Exception as e:
        print(f"rgan: warning: could not log the final generator to MLflow ({type(e).__name__}: {e})",
              file=sys.stderr, flush=True)
        return None
    metadata, uri = dict(trained.metadata), tracker.uri

    def log(client: Any, run_id: str) -> None:
        try:
            model_id = _log_model(client, run_id, exported, metadata, uri, int(step))
        except Exception as e:  # the run's metrics and files are in; only the model is missing
            print(f"rgan: warning: could not log the final generator to MLflow ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)
            return
        client.set_tag(run_id, "rgan.generator_model", f"runs:/{run_id}/{ARTIFACT_PATH}")
        client.set_tag(run_id, "rgan.generator_model_id", model_id)

    tracker.submit(log)
    return final
