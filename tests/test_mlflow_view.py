"""What a run looks like in the MLflow UI: metric names grouped as train/... and eval/..., sample grids on the
image slider (`log_image`), system metrics from rank 0, the run described in words, the data set's identity,
FID timestamps at the moment of the evaluation, and an ETA that counts evaluations.

Each run here is a real training job against a real MLflow store (SQLite + artifact folder in tmp_path), with
a stand-in evaluator instead of Inception (the FID protocol has its own tests)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from conftest import DEMO, TINY
from jobs import image_steps

from rgan_dist import losses
from rgan_dist.config import load_config
from rgan_dist.engine.hooks import Eta
from rgan_dist.engine.loop import train
from rgan_dist.run_info import LOSS_WORDS, PENALTY_WORDS, describe_run
from rgan_dist.tracking import EVAL_METRICS, mlflow_name

BASE = [*TINY, "train.batch_size=8", "train.log_every=1", "checkpoint.every=0", "tracking.log_checkpoints=none",
        "tracking.log_fid_stats=false"]


class SlowEvaluator:
    """Stands in for FID: a value that falls with the step, after a pause long enough for the system metrics
    monitor (sampling every 0.1 s here) to take samples while the run is open."""

    protocol = {"fid.network_source": "test stand-in"}

    def __init__(self, pause_s: float = 0.4) -> None:
        self.pause_s = pause_s
        self.calls: list[int] = []

    def __call__(self, step: int, generator) -> dict[str, float]:
        self.calls.append(step)
        time.sleep(self.pause_s)
        return {"fid": 100.0 / step, "kid": 1.0 / step, "kid_std": 0.0, "eval_seconds": self.pause_s}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.chdir(tmp_path)


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


@pytest.mark.slow
def test_a_run_reads_at_a_glance_in_mlflow(tmp_path, capfd):
    import numpy as np
    from mlflow import MlflowClient
    from PIL import Image

    from data_pipeline.writer import write_shards

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    shards = tmp_path / "shards"  # a real shard set with a manifest, as `rgan shards` writes it
    write_shards([str(images)], shards, 16, fmt="png", shard_size=8)
    db = tmp_path / "mlflow.db"
    cfg = load_config(DEMO, [*BASE, "train.steps=6", "train.sample_every=2", "eval.every=3", "train.progress=true",
                             f"data.shards={shards}", "data.workers=0", "model.channels=3", "loss.name=rasgan",
                             "loss.penalty=r1", "loss.penalty_weight=10", "train.n_dis=1",
                             f"run.out_dir={tmp_path}/run",
                             f"tracking.mlflow_uri=sqlite:///{db}", "tracking.experiment=glance",
                             "tracking.system_metrics_interval_s=0.1"])
    evaluator = SlowEvaluator()
    result = train(cfg, evaluator=evaluator)
    assert result.step == 6 and evaluator.calls == [3, 6]

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("glance").experiment_id])
    rid, tags, metrics = run.info.run_id, run.data.tags, run.data.metrics

    # sample grids on the image card: one per sample step and the untrained G's at step 0 (where 3.17's slider
    # opens), under the key "samples"; the card shows the grid itself; the same files under samples/
    files = _artifacts(client, rid)
    assert image_steps(files, "samples") == [0, 2, 4, 6]
    assert {f"samples/step_{s:07d}.png" for s in (0, 2, 4, 6)} <= files
    card = sorted(f for f in files if f.startswith("images/samples+step+6+"))
    assert len(card) == 2 and card[0].endswith("+compressed.png")
    assert Image.open(client.download_artifacts(rid, card[0], str(tmp_path))).size == \
        Image.open(cfg.out_dir / "samples" / "step_0000006.png").size
    assert tags.get("mlflow.loggedImages") == "True"

    # system metrics, sampled while the run was open (rank 0's tracker is the only one that samples)
    system = {k for k in metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, sorted(metrics)

    # grouped names in MLflow; the JSONL record keeps the names the code uses
    grouped = set(metrics) - system
    assert {"train/d_loss", "train/g_loss", "train/img_per_s", "train/penalty", "eval/fid", "eval/kid",
            "eval/elapsed_s"} <= grouped
    assert all(k.startswith(("train/", "eval/")) for k in grouped), sorted(grouped)
    records = [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("d_loss" in r for r in records if "fid" not in r)
    assert [r["step"] for r in records if "fid" in r] == [3, 6]

    # FID carries its step and the wall-clock moment the evaluation ended (the JSONL record's time), and
    # eval/elapsed_s the seconds since the run started, for an FID-vs-time x-axis shared by all runs
    fid = sorted(client.get_metric_history(rid, "eval/fid"), key=lambda m: m.step)
    fid_records = [r for r in records if "fid" in r]
    assert [(m.step, m.value, m.timestamp) for m in fid] == [
        (r["step"], r["fid"], int(r["time"] * 1000)) for r in fid_records]
    elapsed = sorted(client.get_metric_history(rid, "eval/elapsed_s"), key=lambda m: m.step)
    assert [m.step for m in elapsed] == [3, 6]
    for e, f in zip(elapsed, fid, strict=True):
        assert e.value == pytest.approx((f.timestamp - run.info.start_time) / 1000, abs=0.01)
    assert elapsed[1].value - elapsed[0].value >= evaluator.pause_s  # the second evaluation's pause is in it

    # the run described in words; the data set identified as the FID protocol identifies it
    assert tags["mlflow.note.content"].startswith(
        "RaSGAN (relativistic average standard GAN) with R1 penalty (zero-centred, on reals) weight 10, "
        "1 D step per G step, DCGAN 16px, batch 8, fp32")
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    expected = hashlib.sha256(json.dumps([s["sha256"] for s in manifest["shards"]]).encode()).hexdigest()
    assert tags["rgan.dataset_sha256"] == expected and tags["rgan.dataset"] == str(shards)
    assert tags["rgan.dataset_samples"] == str(manifest["num_samples"])
    assert tags["fid.network_source"] == "test stand-in"  # the protocol tags stay

    # the progress bar's ETA (evaluations included) replaces tqdm's own remaining-time guess
    err = capfd.readouterr().err
    assert "eta=" in err and "<" not in err.split("eta=")[-1].splitlines()[0], err[-2000:]


@pytest.mark.slow
def test_system_metrics_can_be_switched_off(tmp_path):
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    cfg = load_config(DEMO, [*BASE, "train.steps=2", "train.sample_every=0", f"run.out_dir={tmp_path}/run",
                             f"tracking.mlflow_uri=sqlite:///{db}", "tracking.experiment=quiet",
                             "tracking.system_metrics=false", "tracking.system_metrics_interval_s=0.05"])
    train(cfg, evaluator=SlowEvaluator(pause_s=0.3))  # eval.every=0: never called; the run lasts >> 0.05 s
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("quiet").experiment_id])
    assert "train/d_loss" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/")]


def test_metric_groups_and_words_cover_every_name():
    assert mlflow_name("d_loss") == "train/d_loss" and mlflow_name("img_per_s") == "train/img_per_s"
    assert mlflow_name("fid") == "eval/fid" and mlflow_name("modes") == "eval/modes"
    assert mlflow_name("system/cpu_utilization_percentage") == "system/cpu_utilization_percentage"
    # every name an evaluator returns is grouped as an evaluation
    assert {"fid", "kid", "kid_std", "eval_seconds", "modes", "modes_kl", "modes_seconds"} <= EVAL_METRICS
    assert set(LOSS_WORDS) == set(losses.LOSSES) and set(PENALTY_WORDS) == set(losses.PENALTIES)


def test_description_names_the_variant_in_words():
    cfg = load_config(DEMO, ["loss.name=rsgan", "loss.penalty=wgan-gp", "train.n_dis=5", "model.resolution=64",
                             "train.batch_size=32", "train.ema=0"])
    text = describe_run(cfg, world_size=4)
    assert text.startswith("RSGAN (relativistic standard GAN) with WGAN-GP penalty (one-centred, on interpolates) "
                           "weight 10, 5 D steps per G step, DCGAN 64px, batch 32 per rank x 4 ranks (128 per step)")
    assert "no EMA" in text and "sklearn:digits" in text


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_eta_counts_the_evaluations_still_due():
    clock = FakeClock()
    eta = Eta(step=0, total=100, eval_every=25, clock=clock)
    clock.now += 10.0  # 10 steps at 1 s each; no evaluation measured yet: its cost is unknown
    assert eta.seconds_left(10) is None and eta.text(10) == "1m30s+4 evals"
    clock.now += 15.0  # step 25 is logged before its evaluation runs: 4 evaluations still due
    assert eta.text(25) == "1m15s+4 evals"
    clock.now += 50.0  # the evaluation at step 25 took 50 s
    eta.add_eval(50.0)
    # 75 steps at 1 s (the evaluation is not training time) + 3 evaluations (50, 75, 100) at 50 s
    assert eta.seconds_left(25) == pytest.approx(75 + 3 * 50)
    assert eta.text(25) == "3m45s"
    clock.now += 75.0 + 2 * 80.0  # to step 100 through evaluations at 50 and 75 that took 80 s each
    eta.add_eval(80.0)
    eta.add_eval(80.0)
    assert eta.seconds_left(100) == pytest.approx(70.0)  # the one at 100 is still due: mean (50+80+80)/3
    resumed = Eta(step=40, total=100, eval_every=25, clock=clock)  # evaluations at 50, 75, 100 are due
    assert resumed.evals_left() == 3
    no_eval = Eta(step=40, total=100, eval_every=0, clock=clock)
    clock.now += 6.0
    assert no_eval.seconds_left(46) == pytest.approx(54.0) and no_eval.text(40) == "?"


@pytest.mark.slow
def test_two_ranks_log_one_run_with_rank_0s_system_metrics(tmp_path):
    from jobs import ok, torchrun
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    out = ok(torchrun(tmp_path / "run", "train.steps=20", "tracking.enabled=true", f"tracking.mlflow_uri=sqlite:///{db}",
                      "tracking.experiment=two", "tracking.system_metrics_interval_s=0.2", timeout=240))
    assert out.count("MLflow system metrics every") == 1  # rank 1 has the null tracker: no monitor, no run
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("two").experiment_id])
    assert run.data.tags["rgan.world_size"] == "2" and "x 2 ranks" in run.data.tags["mlflow.note.content"]
    assert "system/cpu_utilization_percentage" in run.data.metrics and "train/d_loss" in run.data.metrics
