"""The final generator as an MLflow model, so a run in the UI holds something a user can load and sample:

    G = mlflow.pyfunc.load_model("runs:/<run_id>/generator")
    images = G.predict(np.random.randn(8, z_dim).astype("float32"))   # [8, C, R, R] in [-1, 1]

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


def log_final_generator(tracker: Tracker, checkpoint: Path | None, out_dir: Path) -> Path | None:
    """Export the generator of `checkpoint` to `<out_dir>/generator/G.safetensors`, wrap it as a pyfunc model
    and log that under `generator` in `tracker`'s MLflow run. Only an MLflow tracker that still works (rank 0,
    tracking enabled) does anything; returns the model folder or None. A failure here is one warning line:
    the run itself has finished by now."""
    from rgan_dist.tracking import MlflowTracker

    if not isinstance(tracker, MlflowTracker) or tracker.failed or checkpoint is None:
        return None
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
    for f in sorted(p for p in final.rglob("*") if p.is_file()):
        rel = f.parent.relative_to(final)
        tracker.log_artifact(f, ARTIFACT_PATH if str(rel) == "." else f"{ARTIFACT_PATH}/{rel.as_posix()}")
    tracker.set_tags({"rgan.generator_model": f"runs:/{tracker.run_id}/{ARTIFACT_PATH}"})
    return final
