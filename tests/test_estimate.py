"""`rgan train --dry-run` and `rgan sweep --dry-run`: the cost of a run or sweep before it starts, from a few
steps measured on this machine (or a given step time), with nothing trained or written."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO, ROOT, TINY

from data_pipeline.writer import write_shards
from launcher.cli import main

SMOKE = ROOT / "configs" / "sweeps" / "smoke.yaml"
SMALL = [*TINY, "train.batch_size=8", "data.workers=0"]


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """A default MLflow store or runs/ folder would land here: the dry run must leave it empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_train_dry_run_measures_a_real_trainer_and_writes_nothing(tmp_path, capsys):
    shards = tmp_path.parent / f"{tmp_path.name}-shards"
    m = write_shards(["sklearn:digits"], shards, 16, fmt="png", shard_size=700)
    est = _json(capsys, ["train", "--config", str(DEMO), *SMALL, "model.channels=3", "train.steps=1000",
                         f"data.shards={shards}",
                         "--dry-run", "--json", "--world-size", "2"])
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store, no checkpoint
    assert est["step_time_source"].startswith("measured: 5 steps after 2 warm-up, one process (cpu")
    s = est["step_seconds"]
    assert 0 < s < 60
    # rasgan draws a fresh real batch for its G step: 2 batches of 8 per step and rank, 2 ranks
    assert est["img_per_s"] == pytest.approx(2 * 8 * 2 / s)
    assert est["wall_seconds"] == pytest.approx(1000 * s) and est["device_hours"] == pytest.approx(2000 * s / 3600)
    d = est["data"]
    assert d["bytes"] == sum(x["bytes"] for x in m["shards"]) == sum(p.stat().st_size for p in shards.glob("*.tar"))
    assert (d["samples"], d["shards"]) == (1797, 3)
    assert d["bytes_per_sample"] == pytest.approx(d["bytes"] / 1797)
    assert d["epochs_streamed"] == pytest.approx(1000 * 16 * 2 / 1797)
    assert est["evaluation"] == {"count": 0, "samples": 10000, "metrics": ["fid", "kid"], "seconds": None,
                                 "note": "not timed (excluded)"}


def test_train_dry_run_with_a_given_step_time_prints_the_plan(capsys):
    assert main(["train", "--config", str(DEMO), *SMALL, "train.steps=1000", "eval.every=250",
                 "eval.num_samples=500", "loss.name=sgan", "train.n_dis=2", "--dry-run", "--step-time", "0.5",
                 "--world-size", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "rgan train: dry run of 'demo': nothing trained, no run folder written"
    assert "0.5 s per generator step (given (--step-time))" in out[1]
    assert "128.0 img/s (16 real images per step x 4 rank(s))" in out[2]  # sgan's G step draws no reals
    assert "1000 steps -> 8m 20s wall, 0.556 device-hours (4 rank(s); all-reduce between ranks not measured)" in out[3]
    assert "excluded (not timed): 4 evaluation(s) of 500 samples (fid, kid)" in out[4]
    assert "1797 samples per epoch; embedded, held in memory" in out[5]


@pytest.mark.parametrize(("argv", "message"), [
    (["--dry-run", "--step-time", "0"], "--step-time 0.0: give the seconds one generator step takes"),
    (["--step-time", "1"], "--step-time only goes with --dry-run"),
    (["--json"], "--json only goes with --dry-run"),
    (["--dry-run", "--world-size", "0", "--step-time", "1"], "--world-size 0: give the number of ranks"),
    (["--world-size", "2"], "--world-size only plans a --dry-run"),
])
def test_bad_dry_run_arguments_are_one_line(capsys, argv, message):
    assert main(["train", "--config", str(DEMO), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_sweep_dry_run_given_step_time_packs_trials_onto_slots(tmp_path, capsys):
    est = _json(capsys, ["sweep", "--config", str(SMOKE), "--dry-run", "--json", "--step-time", "0.5",
                         "train.steps=40"])
    # 4 trials x 40 steps x 0.5 s = 20 s each, 2 at once (max_concurrent_trials) -> 40 s; ASHA: an upper bound
    assert (est["trials"], est["concurrency"], est["scheduler"], est["upper_bound"]) == (4, 2, "asha", True)
    assert est["wall_seconds"] == pytest.approx(40) and est["device_hours"] == pytest.approx(80 / 3600)
    assert [t["evaluation"]["count"] for t in est["per_trial"]] == [4] * 4
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sweep_dry_run_measures_each_trial_config(tmp_path, capsys):
    sweep = tmp_path.parent / f"{tmp_path.name}-sweep.yaml"
    sweep.write_text(f"base: {DEMO}\noverrides: {{model.resolution: 16, model.width: 8, model.z_dim: 16, "
                     "train.batch_size: 4, train.steps: 100, eval.every: 50, data.workers: 0}\n"
                     "space:\n  loss.penalty: {grid: [none, r1]}\n  train.lr_d: {loguniform: [1.0e-5, 1.0e-3]}\n"
                     "max_concurrent_trials: 1\nresources: {workers: 2, cpus_per_worker: 1}\n")
    argv = ["sweep", "--config", str(sweep), "--dry-run", "--num-cpus", "8", "dist.strategy=ddp"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "2 trial(s) over loss.penalty, train.lr_d" in out
    assert out.count("measured: 5 steps after 2 warm-up, one process (cpu, strategy ddp)") == 1
    assert "trials       2, 1 at once (max_concurrent_trials=1), 2 device(s) each" in out
    assert "an upper bound" not in out  # fifo runs every trial to the end
    assert list(tmp_path.iterdir()) == []
