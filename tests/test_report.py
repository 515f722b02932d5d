"""`rgan report` on a tracking store holding three short training runs with FID curves.

The runs are real (tiny models, 4 steps) and log through the real MLflow tracker into a SQLite store;
their FIDs come from the real evaluator path with a small stand-in feature network (the Inception
network would cost minutes here and the report does not care which network produced the numbers,
only that the provenance it prints is the one the runs recorded).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import DEMO, TINY
from PIL import Image
from torch import nn

from launcher import report as report_cli
from rgan_dist.config import load_config
from rgan_dist.engine.loop import train
from rgan_dist.metrics.evaluator import FidEvaluator, digits_reference_stats
from rgan_dist.metrics.inception import InceptionInfo, InceptionNetwork
from rgan_dist.report import summarize_experiment, write_report

BASE = [*TINY, "train.batch_size=8", "train.log_every=1", "train.sample_every=0", "checkpoint.every=0",
        "tracking.log_checkpoints=none", "tracking.log_fid_stats=false", "train.steps=4", "eval.every=2",
        "eval.num_samples=16", "eval.batch_size=8", "eval.use_ema=false", "tracking.experiment=paper"]
# different seeds (so different initial generators) and the raw G: four steps must give distinct curves
VARIANTS = {"run-rsgan": ["loss.name=rsgan", "train.seed=1"],
            "run-rasgan-gp": ["loss.name=rasgan", "loss.penalty=wgan-gp", "model.d_batch_norm=false", "train.seed=2"],
            "run-ralsgan": ["loss.name=ralsgan", "train.lr_g=1e-3", "train.seed=3"]}


class _Features(nn.Module):
    """4x4 average-pooled pixels: crude, but it tells noise from digits, so the runs' curves differ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


class _StandInEvaluator(FidEvaluator):
    """The real evaluator (records, tags, artifacts, broadcast) with a small network already loaded."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg, progress=False)
        info = InceptionInfo(source="test stand-in", path="<memory>", sha256="ab" * 32, convention="tf-range-299")
        self.net = InceptionNetwork(_Features().eval(), info, torch.device("cpu"))
        self.reference = digits_reference_stats(self.net, resolution=16, num_samples=16, batch_size=8,
                                                keep_features=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("RGAN_DATA_CACHE", str(root / "cache"))
    logged = {}
    try:
        for name, extra in VARIANTS.items():
            cfg = load_config(DEMO, [*BASE, *extra, f"run.name={name}", f"run.out_dir={root}/{name}",
                                     f"tracking.mlflow_uri={uri}"])
            train(cfg, evaluator=_StandInEvaluator(cfg))
            records = [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
            logged[name] = [(r["step"], r["fid"]) for r in records if "fid" in r]
    finally:
        mp.undo()
    return root, uri, logged


def test_report_writes_the_table_and_plots(store, tmp_path):
    root, uri, logged = store
    paths, runs = write_report("paper", tmp_path / "out", uri)
    text = paths["markdown"].read_text()
    rows = [line for line in text.splitlines() if line.startswith("| run-")]
    assert len(rows) == 3
    by_name = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        by_name[cells[0]] = cells
    assert by_name["run-rsgan"][1] == "rsgan"
    assert by_name["run-rasgan-gp"][1] == "rasgan + wgan-gp"
    assert by_name["run-ralsgan"][1] == "ralsgan"
    for name, curve in logged.items():
        assert [s for s, _ in curve] == [2, 4]
        best_step, best = min(curve, key=lambda c: c[1])
        cells = by_name[name]
        assert cells[2] == f"{best:.2f} ({best_step})"
        assert cells[3] == f"{curve[-1][1]:.2f} (4)"
        assert cells[4] == "4" and cells[7] == "FINISHED"
        assert re.fullmatch(r"\d+m\d\ds", cells[5]) and int(cells[6]) > 0  # wall-clock, images/s
    order = [r.strip("|").split("|")[0].strip() for r in rows]
    assert order == sorted(logged, key=lambda n: min(f for _, f in logged[n]))  # best FID first
    assert "network_source: test stand-in" in text and "network_sha256: " + "ab" * 32 in text  # as recorded
    assert "num_samples: 16" in text and "not comparable" not in text

    for key in ("fid_vs_step", "fid_vs_time"):
        with Image.open(paths[key]) as im:
            pixels = np.asarray(im.convert("L"), dtype=np.float32)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 5
        assert f"]({paths[key].name})" in text
    curves = {r.name: r.fid_curve for r in runs}
    assert {n: [(s, f) for s, _, f in c] for n, c in curves.items()} == logged
    assert all(t >= 0 for c in curves.values() for _, t, _ in c)  # seconds since each run started


def test_report_cli_and_errors(store, tmp_path, capsys):
    _, uri, _ = store
    assert report_cli.main(["--experiment", "paper", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.count("| run-") == 3 and "fid_vs_time.png" in out
    assert (tmp_path / "r" / "report.md").is_file()
    assert report_cli.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "experiments there: " in capsys.readouterr().err
    assert report_cli.main(["--experiment", "paper", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no MLflow store" in capsys.readouterr().err


def test_mixed_fid_provenance_is_flagged(store):
    from mlflow import MlflowClient

    _, uri, _ = store
    client = MlflowClient(tracking_uri=uri)
    runs = summarize_experiment("paper", uri)
    client.set_tag(runs[0].run_id, "fid.num_samples", "50000")
    try:
        from rgan_dist.report import provenance_note

        note = provenance_note(summarize_experiment("paper", uri))
        assert "num_samples differs between runs (16, 50000)" in note and "not comparable" in note
    finally:
        client.set_tag(runs[0].run_id, "fid.num_samples", "16")


def test_a_sweep_reports_its_trials_with_the_parent_as_the_header(store, tmp_path, capsys):
    """Issue 19: a sweep of 4 trials read "5 runs" and had a row of "?" for the parent run."""
    from mlflow import MlflowClient

    _, uri, _ = store
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("a-sweep")
    parent = client.create_run(exp, run_name="lr-sweep", tags={"rgan.sweep": "lr-sweep"}).info.run_id
    for i in range(4):
        trial = client.create_run(exp, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent,
                                                                    "loss.name": "rsgan"}).info.run_id
        client.log_param(trial, "loss.name", "rsgan")
        client.log_metric(trial, "fid", 10.0 + i, step=2)
        client.set_terminated(trial)
    client.set_terminated(parent)
    assert report_cli.main(["--experiment", "a-sweep", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "4 run(s)" in out and "Sweep `lr-sweep` (parent run " in out and "4 trial(s)" in out
    assert out.count("| trial-") == 4 and "| lr-sweep" not in out and "| ? " not in out, out
    md = (tmp_path / "r" / "report.md").read_text()
    assert "4 run(s)" in md and "Sweep `lr-sweep`" in md and "| lr-sweep" not in md
