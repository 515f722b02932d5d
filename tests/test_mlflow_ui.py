"""What a person sees of our runs in the MLflow 3.17 UI, checked in a real browser: `mlflow server` on 127.0.0.1
over a store that tiny real runs wrote (two loss variants of a few steps on the embedded digits, and a two-trial
sweep), opened in headless Chromium (Debian's `chromium` package, driven by Playwright's Python client; .ci/run
installs it). The pieces (store, server, browser) are scripts/ui_screenshots.py's, which takes the README's
screenshots with them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT / "scripts"))
import ui_screenshots as ui  # noqa: E402

from rgan_dist.mlflow_view import EXPERIMENT_KIND, ui_link  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
STEPS, SAMPLE_EVERY = 4, 2
LOSSES = ("rsgan", "rasgan")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(store folder, server URL, experiment ids by name, a browser page)."""
    root = tmp_path_factory.mktemp("ui")
    ui.train_variants(root, steps=STEPS, sample_every=SAMPLE_EVERY, losses=LOSSES)
    ui.run_sweep(root, steps=4)
    ids = ui.experiment_ids(root)
    with ui.mlflow_server(root) as base, ui.browser() as page:
        yield root, base, ids, page


def _client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(ui.store_uri(root))


def _runs(root: Path, experiment_id: str) -> list:
    return _client(root).search_runs([experiment_id])


def test_the_experiment_opens_on_the_training_runs_view(site):
    root, base, ids, page = site
    for name in (ui.VARIANTS_EXPERIMENT, ui.SWEEP_EXPERIMENT):  # runs and sweeps: one place creates experiments
        tags = _client(root).get_experiment(ids[name]).tags
        assert {k: tags.get(k) for k in EXPERIMENT_KIND} == EXPERIMENT_KIND
    ui.open_page(page, ui_link(base, ids[ui.VARIANTS_EXPERIMENT]), "digits-rsgan")
    ui.runs_listed(page)
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url, page.url
    text = page.inner_text("body")
    assert "digits-rasgan" in text and "Token usage" not in text and "Detect Issues" not in text, text[:2000]


def test_the_run_page_shows_the_latest_grid_whole_and_the_slider_opens_on_a_logged_step(site):
    root, base, ids, page = site
    run = next(r for r in _runs(root, ids[ui.VARIANTS_EXPERIMENT]) if r.info.run_name == "digits-rsgan")
    grids = sorted((root / "runs" / "rsgan" / "samples").glob("step_*.png"))
    assert [int(g.stem.split("_")[1]) for g in grids] == [0, 2, 4]  # step 0: where the UI's slider opens
    size = Image.open(grids[-1]).size
    url = ui_link(base, ids[ui.VARIANTS_EXPERIMENT], run.info.run_id).replace("?", "/model-metrics?")
    ui.open_page(page, url, "Add section")
    ui.image_cards_in_view(page)
    page.wait_for_function("() => [...document.images].some(i => i.src.includes('images') && i.complete)")
    page.wait_for_timeout(2000)
    (first,) = ui.image_card_images(page)
    assert "+step+0+" in first["src"], first  # the slider opens on a grid, not on "No image logged at this step"
    assert (first["naturalWidth"], first["naturalHeight"]) == size  # the grid itself, not a 256 px WebP copy
    ui.card_last_step(page)
    page.wait_for_function(
        f"() => [...document.images].some(i => decodeURIComponent(i.src).includes('+step+{STEPS}+') && i.complete)")
    (last,) = ui.image_card_images(page)
    assert f"+step+{STEPS}+" in last["src"] and (last["naturalWidth"], last["naturalHeight"]) == size, last


def test_the_runs_table_shows_the_dataset_and_the_model(site):
    root, base, ids, page = site
    ui.open_page(page, ui_link(base, ids[ui.VARIANTS_EXPERIMENT]), "digits-rsgan")
    ui.runs_listed(page)
    for run in _runs(root, ids[ui.VARIANTS_EXPERIMENT]):
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.name == "sklearn:digits" and len(dataset.dataset.digest) == 36
        assert [o.model_id for o in run.outputs.model_outputs] == [run.data.tags["rgan.generator_model_id"]]
    text = page.inner_text("body")
    assert text.count(f"sklearn:digits ({run.inputs.dataset_inputs[0].dataset.digest[:8]}") == len(LOSSES), text
    assert page.get_by_role("link", name="generator").count() == len(LOSSES), text  # the Models column


def test_a_sweeps_parent_expands_to_its_trials(site):
    root, base, ids, page = site
    runs = _runs(root, ids[ui.SWEEP_EXPERIMENT])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2
    ui.open_page(page, ui_link(base, ids[ui.SWEEP_EXPERIMENT]), parent.info.run_name)
    ui.runs_listed(page)
    body = page.inner_text("body")
    assert not any(t in body for t in trials), "the trials should be folded under their parent at first"
    ui.expand_parent(page)
    page.get_by_text(trials[0]).first.wait_for()
    body = page.inner_text("body")
    assert all(t in body for t in trials), body[:3000]
    # the best trial's run and its logged model say so
    best = parent.data.tags["rgan.sweep.best_run"]
    best_run = next(r for r in runs if r.info.run_name == best)
    model = _client(root).get_logged_model(best_run.data.tags["rgan.generator_model_id"])
    assert model.tags.get("rgan.sweep.best") == "ui-sweep" and best_run.data.tags["rgan.sweep.best"] == "ui-sweep"
