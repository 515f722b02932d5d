"""What a person sees of a run in MLflow 3.17's UI, and what that UI needs from the logged data (found in its
own code, mlflow/server/js/build; checked in a browser by tests/test_mlflow_ui.py):

- An experiment opens on the model-training pages only through the sidebar's "GenAI | Model training" switch
  (remembered per browser, GenAI at first) or a link's `workflowType=machine_learning`; the experiment tag
  `mlflow.experimentKind` (EXPERIMENT_KIND) names the kind in the experiment list and to MLflow's tools.
- An image card reads `images/<key>+step+<step>+timestamp+<ms>+<uuid>.png` (the full image, its enlarged
  preview) and the same name with `+compressed` (what the card shows, fitted into a square); its step slider
  starts at step 0, and by default it lists every run parameter above the image ("Show run parameters").
- The Dataset column shows a run's dataset inputs (name and digest, at most 36 characters); the Models column
  the logged models the run output (`mlflow_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What MLflow 3.17's UI calls a model-training experiment (its other kind is "genai_development"). The tag names
# the experiment's kind in the experiment list and to MLflow's own tools; the 3.17 experiment page itself follows
# the sidebar's "GenAI | Model training" switch instead (remembered per browser, GenAI at first), so the links we
# print carry `ui_link`'s `workflowType=machine_learning`, which opens the runs table whatever the switch says.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CARD_IMAGE_MAX = 512  # px, the long side of the image an MLflow image card shows (`image_card_files`)


def image_card_files(image: Path, key: str, step: int, ms: int, folder: Path) -> tuple[Path, Path]:
    """The two files of one step of an MLflow image card, written into `folder` under the names MLflow 3.17's
    `log_image(key=, step=)` uses and its UI parses (`<key>+step+<step>+timestamp+<ms>+<uuid>` with `.png`, and
    `+compressed` for what the card displays; the full file is its click-to-enlarge preview), to be logged
    under the run's `images/`.

    Why not `MlflowClient.log_image`: its card image is always resized to 256 px on the long side and saved as
    lossy WebP, which blurs a 146 px grid of 16 px samples into mush (bilinear upscaling) and smears a large
    one. Here the card image is the grid itself, pixel for pixel, as long as its long side is at most
    `CARD_IMAGE_MAX` (the card scales it to fit, whole), and a Lanczos reduction to that size otherwise."""
    import shutil
    import uuid

    from PIL import Image

    name = f"{key.replace('/', '~')}+step+{int(step)}+timestamp+{ms}+{uuid.uuid4()}"
    full, card = folder / f"{name}.png", folder / f"{name}+compressed.png"
    shutil.copyfile(image, full)
    with Image.open(image) as im:
        if max(im.size) <= CARD_IMAGE_MAX:
            shutil.copyfile(image, card)
        else:
            small = im.convert("RGB")
            small.thumbnail((CARD_IMAGE_MAX, CARD_IMAGE_MAX), Image.Resampling.LANCZOS)
            small.save(card)
    return full, card


def ui_link(base: str, experiment: str, run_id: str | None = None) -> str:
    """The MLflow UI's address of an experiment's runs table (or of one run) under the server at `base`, opened
    in the model-training view: 3.17 otherwise opens an experiment on its GenAI pages (EXPERIMENT_KIND says why)."""
    path = f"/runs/{run_id}" if run_id else "/runs"
    return f"{base.rstrip('/')}/#/experiments/{experiment}{path}?workflowType=machine_learning"


def dataset_input(tags: dict[str, str]) -> Any:
    """The training data as an MLflow dataset input (`mlflow.entities.DatasetInput`, context "training"), from
    the run's `dataset_tags`: the runs table's Dataset column and the run's Datasets panel show it. Name and source
    are the data spec (a shard folder, manifest or URL list; `sklearn:digits`); the digest is the shard set's
    sha256 identity cut to MLflow's 36-character limit (the profile holds all 64 characters), for the embedded
    digits the sha256 of scikit-learn's array; the profile has the sample count where it is known."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    spec = tags["rgan.dataset"]
    sha, count = tags.get("rgan.dataset_sha256"), tags.get("rgan.dataset_samples")
    if spec.startswith("sklearn:") and sha is None:
        from sklearn.datasets import load_digits

        images = load_digits().images
        sha, count = hashlib.sha256(images.tobytes()).hexdigest(), len(images)
    profile: dict[str, Any] = {"sha256": sha} if sha else {}
    if count is not None:
        profile["num_samples"] = int(count)
    scheme = spec.split("://", 1)[0] if "://" in spec else ("code" if spec.startswith("sklearn:") else "local")
    digest = (sha or hashlib.sha256(spec.encode()).hexdigest())[:36]  # no manifest: the spec is all we know
    dataset = Dataset(name=spec[-500:], digest=digest, source_type=scheme, source=json.dumps({"uri": spec}),
                      profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])
