"""`rgan sweep`: sweep files are checked before Ray starts; on a local Ray (2 CPUs) the smoke sweep runs
4 real trials with real FIDs, ASHA stops the bad ones, MLflow nests the trials under one parent run, a
failing trial resumes from its checkpoint, a killed driver's sweep continues, and a multi-worker trial
runs DDP through Ray Train. The paper's numbers are data, matched to trials by their config."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher import sweep as sweep_cli
from rgan_dist.config import Config, load_config
from rgan_dist.errors import ConfigError, UsageError
from rgan_dist.paper_reference import beside_paper, get_table, paper_fid
from rgan_dist.run_info import LOSS_WORDS
from rgan_dist.sweep import (
    SWEEP_FAULT_ENV,
    FaultOnce,
    load_sweep,
    make_scheduler,
    planned_trials,
    run_sweep,
    trial_overrides,
    trial_run_name,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ROOT / "configs" / "sweeps"
DEMO = ROOT / "configs" / "demo.yaml"

# The smoke sweep's tiny trial, for the sweeps the tests write themselves.
TINY = {
    "model.resolution": 16, "model.width": 8, "model.z_dim": 16, "train.batch_size": 16, "train.steps": 20,
    "train.log_every": 5, "train.sample_every": 0, "train.ema": 0.0, "eval.every": 10, "eval.num_samples": 8,
    "eval.batch_size": 8, "eval.kid": False, "data.workers": 0, "tracking.log_checkpoints": "none",
}


def write_sweep(path: Path, **fields) -> Path:
    data = {"base": str(DEMO), "overrides": dict(TINY), "space": {"loss.name": "rsgan"}, **fields}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mlflow_runs(db: Path, experiment: str) -> tuple:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {db}"
    return client, client.search_runs([exp.experiment_id])


# ---------------------------------------------------------------------------------------- the files


def test_shipped_sweeps_are_valid_and_plan_the_documented_trials():
    counts = {p.stem: len(planned_trials(load_sweep(p))) for p in sorted(SWEEPS.glob("*.yaml"))}
    assert counts == {"smoke": 4, "paper_cifar10": 20, "paper_cat": 21}


def test_paper_cifar10_sweep_is_table_1():
    """Every loss variant of Table 1 under both setups; each trial finds its paper cell by config."""
    spec = load_sweep(SWEEPS / "paper_cifar10.yaml")
    base = spec.base_config.flat()
    table = get_table("cifar10")
    variants = {row["variant"] for row in table.rows}
    found = {}
    for trial in planned_trials(spec):
        params = {**base, **trial_overrides(trial)}
        cell = paper_fid("cifar10", params)
        found[(trial["variant"]["label"], trial["setup"]["label"])] = cell
    assert {v for v, _ in found} == variants and len(found) == 20
    with_values = {k: c for k, c in found.items() if c is not None}
    expected = sum(len(row["fid"]) for row in table.rows)
    assert len(with_values) == expected == 16
    assert found[("RSGAN-GP", "lr2e-4-nD1")].fid == 25.60   # the headline: RSGAN-GP with n_D = 1 ...
    assert found[("WGAN-GP", "lr1e-4-nD5")].fid == 27.81    # ... against WGAN-GP with n_D = 5
    assert found[("RaSGAN", "lr1e-4-nD5")] is None          # not run by the paper in that setup
    assert spec.scheduler.name == "fifo" and spec.base_config.eval.num_samples == 50000


def test_paper_cat_sweep_matches_the_official_readme():
    spec = load_sweep(SWEEPS / "paper_cat.yaml")
    base = spec.base_config.flat()
    cells = {}
    for trial in planned_trials(spec):
        params = {**base, **trial_overrides(trial)}
        cells[(trial["variant"]["label"], trial["size"]["label"])] = paper_fid("cat", params)
        assert Path(params["data.shards"]).is_absolute()  # trials run in other folders and on other nodes
    assert [cells[("RaLSGAN", s)].fid for s in ("64x64", "128x128", "256x256")] == [11.97, 15.85, 35.21]
    assert cells[("SGAN-SN", "256x256")].fid == 54.73 and cells[("SGAN", "256x256")].text() == "failed"
    assert cells[("WGAN-GP", "256x256")].text() == ">100"
    assert cells[("SGAN-SN", "64x64")] is None


def test_paper_reference_reads_mlflow_string_params():
    params = {"loss.name": "rpgan", "loss.penalty": "wgan-gp", "train.lr_g": "0.0001", "train.lr_d": "0.0001",
              "train.betas": "[0.5, 0.9]", "train.n_dis": "5", "eval.g_mode": "train", "eval.batch_size": "100"}
    assert paper_fid("cifar10", params).fid == 28.13  # rpgan is rsgan
    assert paper_fid("cifar10", {**params, "train.betas": "[0.5, 0.999]"}) is None  # another setup: no value
    assert paper_fid("cifar10", {**params, "loss.name": "rchinge"}) is None
    text = beside_paper([("ours", params, 30.5), ("other", {**params, "train.n_dis": "2"}, None)], "cifar10")
    assert "| ours | RSGAN-GP | lr 1e-4, betas (.5,.9), n_D=5 | 30.50 | 28.13 |" in text
    assert "| other | rsgan + wgan-gp | (not in the paper's table) | – | – |" in text
    with pytest.raises(UsageError, match="paper table 'mnist'"):
        paper_fid("mnist", params)


BAD = {
    "unknown top key": ({"schedule": {"name": "asha"}}, "unknown key 'schedule'"),
    "unknown config key": ({"space": {"train.lr": {"grid": [1e-4]}}}, "space.train.lr: unknown key train.lr"),
    "unknown distribution": ({"space": {"train.lr_d": {"between": [1e-4, 1e-3]}}}, "expected one of grid, choice"),
    "loguniform at zero": ({"space": {"train.lr_d": {"loguniform": [0, 1e-3]}}}, "loguniform needs low > 0"),
    "value out of range": ({"space": {"train.lr_d": {"grid": [2e-4, -1.0]}}}, "train.lr_d=-1.0: must be > 0.0"),
    "group of scalars": ({"space": {"setup": {"grid": [1, 2]}}}, "each entry of a group is a mapping"),
    "contradicting grid": ({"overrides": {**TINY, "model.resolution": 32},
                            "space": {"model.arch": {"grid": ["dcgan", "cnn32"]},
                                      "model.resolution": {"grid": [16, 32]}}},
                           "grid combination {'model.arch': 'cnn32', 'model.resolution': 16}"),
    "no evaluation": ({"overrides": {**TINY, "eval.every": 0}}, "set eval.every > 0"),
    "grace off the eval grid": ({"scheduler": {"name": "asha", "grace_period": 5}}, "not a multiple of eval.every"),
    "pbt changes shapes": ({"scheduler": {"name": "pbt", "mutations": {"model.width": [8, 16]}}},
                           "PBT can change only"),
    "several workers, one process": ({"resources": {"workers": 2}}, "needs dist.strategy ddp or deepspeed"),
    "unknown scheduler": ({"scheduler": {"name": "hyperband"}}, "choose one of fifo, asha, pbt"),
    "unknown paper table": ({"paper": "mnist"}, "paper: 'mnist' unknown"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_sweep_files_fail_before_ray_with_one_line(tmp_path, case):
    fields, message = BAD[case]
    path = write_sweep(tmp_path / "bad.yaml", **fields)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    text = str(e.value)
    assert message in text and "bad.yaml" in text and "\n" not in text


def _sweep_error(path: Path, **fields) -> str:
    with pytest.raises(ConfigError) as e:
        load_sweep(write_sweep(path, **fields))
    return str(e.value)


def _config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, list(overrides))
    return str(e.value).removeprefix("config: ")


def test_a_sweep_file_speaks_the_training_configs_language(tmp_path):
    """One config language: an unknown key or a bad value in the space, the fixed overrides or a PBT mutation
    is config.py's own one-line error (after the file and the place in it), the one `rgan train` gives."""
    bad = tmp_path / "bad.yaml"
    assert f"bad.yaml': space.train.lr: {_config_error('train.lr=1')}" in _sweep_error(bad, space={"train.lr": 1})
    assert _config_error("train.nope=1") in _sweep_error(bad, overrides={**TINY, "train.nope": 1})
    assert _config_error("loss.name=xgan") in _sweep_error(bad, space={"loss.name": {"grid": ["rsgan", "xgan"]}})
    assert _config_error("trian.steps=1") in _sweep_error(bad, space={"g": {"grid": [{"trian.steps": 1}]}})
    pbt = {"name": "pbt", "mutations": {"train.lr_g": [1e-3, -1.0]}}
    assert _config_error("train.lr_g=-1.0") in _sweep_error(bad, scheduler=pbt)


SETTINGS = {
    "unknown setting": ({"num_sample": 2}, "unknown key 'num_sample'; allowed: name, base,"),
    "unknown scheduler setting": ({"scheduler": {"name": "asha", "grace": 10}},
                                  "unknown key scheduler.grace; allowed in scheduler: name, grace_period,"),
    "setting below its minimum": ({"num_samples": 0}, "num_samples=0: must be >= 1"),
    "setting of the wrong type": ({"resources": {"workers": 1.5}}, "resources.workers=1.5: expected an integer"),
    "flag that is no flag": ({"scheduler": {"name": "pbt", "synch": "yes"}}, "scheduler.synch='yes': expected true"),
    "factor out of range": ({"scheduler": {"name": "asha", "reduction_factor": 1}},
                            "scheduler.reduction_factor=1: must be > 1.0"),
    "section that is no mapping": ({"resources": 4}, "resources must be a mapping of keys"),
}


@pytest.mark.parametrize("case", list(SETTINGS), ids=list(SETTINGS))
def test_sweep_settings_are_a_config_section_checked_like_training_ones(tmp_path, case):
    """The sweep's own settings are typed `_f` fields filled by config.py's `fill_section`: the same checks
    and the same one-line errors as a training config's sections."""
    fields, message = SETTINGS[case]
    text = _sweep_error(tmp_path / "bad.yaml", **fields)
    assert text.startswith("sweep '") and "bad.yaml': " in text and message in text and "\n" not in text


def test_cli_turns_a_bad_sweep_into_exit_code_2(tmp_path, capsys):
    path = write_sweep(tmp_path / "bad.yaml", space={"train.lr": 1e-4})
    assert sweep_cli.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rgan sweep: error: ") and "train.lr" in err and err.count("\n") == 1


def test_trial_config_groups_labels_and_hooks():
    config = {"loss.name": "rsgan", "setup": {"label": "fast", "train.lr_d": 1e-3, "train.n_dis": 2}}
    assert trial_overrides(config) == {"loss.name": "rsgan", "train.lr_d": 1e-3, "train.n_dis": 2}
    assert trial_run_name("s", "ab12c_00007", config) == "s-007-rsgan-fast"
    assert FaultOnce("raise@3:trial7", "ab12c_00007", Path("/nonexistent")).step == 3
    assert FaultOnce("raise@3:trial2", "ab12c_00007", Path("/nonexistent")).step is None
    with pytest.raises(UsageError, match=SWEEP_FAULT_ENV):
        FaultOnce("kill@3", "ab12c_00007", Path("/nonexistent"))


def test_tunes_progress_table_shows_a_groups_label():
    """Issue 19: the progress table's "setup" column showed a dict cut to 20 characters. The table is Tune's
    own (`_get_trial_info`): what it prints for each trial of the smoke sweep, resolved by Tune's variant
    generator as in a run, is the group's label, and the trial still reads the group's keys."""
    import copy
    import pickle

    from ray.tune.experimental.output import _infer_params, _max_len
    from ray.tune.search.variant_generator import generate_variants

    from rgan_dist.sweep.space import param_space

    space = param_space(load_sweep(SWEEPS / "smoke.yaml"))
    assert sorted(_infer_params(space)) == ["loss.name", "setup"]
    trials = [config for _, config in generate_variants(space)]
    shown = sorted((_max_len(c["loss.name"]), _max_len(c["setup"])) for c in trials)
    assert shown == [("rasgan", "lr-1e-6"), ("rasgan", "lr-5e-2"), ("rsgan", "lr-1e-6"), ("rsgan", "lr-5e-2")]
    for config in trials:
        for held in (config, copy.deepcopy(config), pickle.loads(pickle.dumps(config))):  # as Tune stores it
            assert str(held["setup"]) in ("lr-5e-2", "lr-1e-6")
            assert set(trial_overrides(held)) == {"loss.name", "train.lr_g", "train.lr_d"}


def test_schedulers_use_generator_steps(tmp_path):
    asha = make_scheduler(load_sweep(SWEEPS / "smoke.yaml"))
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("step", 20, 2)
    path = write_sweep(tmp_path / "pbt.yaml", scheduler={
        "name": "pbt", "perturbation_interval": 10, "mutations": {"train.lr_d": {"loguniform": [1e-4, 1e-2]},
                                                                  "train.n_dis": [1, 2]}})
    pbt = make_scheduler(load_sweep(path))
    assert pbt._time_attr == "step" and pbt._perturbation_interval == 10
    assert set(pbt._hyperparam_mutations) == {"train.lr_d", "train.n_dis"}


# ------------------------------------------------------------------------------------- on local Ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # log_to_driver=False: trial workers' lines reach this process late and asynchronously, and would land in
    # the stderr of whichever test runs then (tests below assert exact one-line errors).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_smoke_sweep_on_local_ray(ray_local, tmp_path, monkeypatch, capsys):
    """4 trials, each with an FID; ASHA stops the too-small learning rates at step 10; MLflow holds a
    parent run and 4 nested child runs with what a single `rgan train` run logs."""
    monkeypatch.chdir(tmp_path)
    assert sweep_cli.main(["--config", str(SWEEPS / "smoke.yaml"), "--verbose", "0"]) == 0
    out_dir = tmp_path / "runs" / "sweeps" / "smoke"
    rows = json.loads((out_dir / "results.json").read_text())
    assert len(rows) == 4
    assert all(r["best_fid"] is not None and math.isfinite(r["best_fid"]) for r in rows)
    assert [r["best_fid"] for r in rows] == sorted(r["best_fid"] for r in rows)
    stopped = [r for r in rows if r["outcome"] == "stopped early"]
    completed = [r for r in rows if r["outcome"] == "completed"]
    assert stopped and all(r["step"] == 10 for r in stopped), rows
    assert completed and all(r["step"] == 20 for r in completed) and len(stopped) + len(completed) == 4
    # The too-small learning rate leaves G untrained: both reach step 10 after the others set the bar there.
    assert all(r in stopped for r in rows if r["params"]["setup"] == "lr-1e-6"), rows
    printed = capsys.readouterr().out
    assert "| # | trial | loss.name | setup | best FID |" in printed and f"| 1 | {rows[0]['name']} |" in printed

    client, runs = mlflow_runs(tmp_path / "mlflow.db", "rgan-sweep-smoke")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5
    assert parent.data.tags["rgan.sweep"] == "smoke" and parent.info.status == "FINISHED"
    assert parent.data.metrics["eval/best_fid"] == pytest.approx(rows[0]["best_fid"])
    assert parent.data.metrics["sweep/trials"] == 4 and "Sweep smoke" in parent.data.tags["mlflow.note.content"]
    assert {"results.md", "results.csv", "smoke.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    by_trial = {r["trial_id"]: r for r in rows}
    for child in children:
        row = by_trial[child.data.tags["rgan.sweep.trial_id"]]
        assert set(child.data.params) == set(Config().flat())          # the params of a single run
        assert child.data.params["loss.name"] == row["params"]["loss.name"]
        assert LOSS_WORDS[row["params"]["loss.name"]] in child.data.tags["mlflow.note.content"]
        fids = client.get_metric_history(child.info.run_id, "eval/fid")
        assert [m.step for m in sorted(fids, key=lambda m: m.step)] == list(range(10, row["step"] + 1, 10))
        assert min(m.value for m in fids) == pytest.approx(row["best_fid"])
        assert {"config.yaml", "fid"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
        assert child.data.tags["rgan.sweep.outcome"] == row["outcome"] and child.info.status == "FINISHED"
        assert row["mlflow_run_id"] == child.info.run_id


@pytest.mark.slow
def test_a_failing_trial_is_retried_from_its_checkpoint(ray_local, tmp_path, monkeypatch):
    """The trial raises once at step 15 (after its checkpoint at 10): Tune retries it, it resumes at
    step 10 (not 0) and completes at step 20, logging into the same MLflow run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SWEEP_FAULT_ENV, "raise@15")
    path = write_sweep(tmp_path / "fault.yaml", name="fault", max_failures=1,
                       overrides={**TINY, "tracking.experiment": "rgan-sweep-fault"})
    result = run_sweep(load_sweep(path), verbose=0)
    (row,) = result.rows
    assert (row.outcome, row.step, row.restored_from_step, row.error) == ("completed", 20, 10, "")
    trial_dir = tmp_path / "runs" / "sweeps" / "fault" / "trials" / row.trial_id
    assert (trial_dir / ".fault-raise-15.fired").is_file()
    records = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
    # the failed attempt raised at 15 before logging it; the retry resumed at 10 (not 0)
    assert [r["step"] for r in records if "d_loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in records if "fid" in r] == [10, 20]
    client, runs = mlflow_runs(tmp_path / "mlflow.db", "rgan-sweep-fault")
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED" and child.data.tags.get("rgan.resumed") == "true"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "eval/fid")) == [10, 20]


@pytest.mark.slow
@pytest.mark.timeout(420)  # > its jobs' own timeouts: a 240 s wait, then the resumed sweep
def test_a_sweep_continues_after_its_driver_is_killed(ray_local, tmp_path, monkeypatch):
    """SIGKILL the driver (another process on the same Ray) once the first trial has reported; `--resume`
    restores the experiment: both trials end at their last step, under the same MLflow parent run."""
    monkeypatch.chdir(tmp_path)
    # --address is a cluster, which needs storage: the folder holds the sweep's outputs and its MLflow store,
    # which the resumed driver (this process, no --address) must find at the same place.
    shared = tmp_path / "shared"
    path = write_sweep(tmp_path / "resume.yaml", name="resume", max_concurrent_trials=1, storage=str(shared),
                       space={"loss.name": {"grid": ["rsgan", "rasgan"]}},
                       overrides={**TINY, "tracking.experiment": "rgan-sweep-resume",
                                  "tracking.mlflow_uri": f"sqlite:///{shared / 'mlflow.db'}"})
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "launcher.sweep", "--config", str(path), "--address", address,
                               "--verbose", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    out_dir = shared / "resume"
    try:
        deadline = time.monotonic() + 240
        while not list(out_dir.glob("trial_*/checkpoint_*")):
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no trial reported in time"
            time.sleep(0.5)
        time.sleep(2)  # let Tune write its experiment state once more
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    assert not (out_dir / "results.json").exists()  # the sweep did not finish
    parent_id = json.loads((out_dir / "sweep.json").read_text())["parent_run_id"]
    with pytest.raises(UsageError, match="pass --resume"):
        run_sweep(load_sweep(path), verbose=0)
    result = run_sweep(load_sweep(path), resume=True, verbose=0)
    assert [r.step for r in result.rows] == [20, 20] and {r.outcome for r in result.rows} == {"completed"}
    assert result.parent_run_id == parent_id
    client, runs = mlflow_runs(shared / "mlflow.db", "rgan-sweep-resume")
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.slow
def test_a_multi_worker_trial_runs_ddp_through_ray_train(ray_local, tmp_path, monkeypatch):
    """resources.workers: 2 -> the trial builds a TorchTrainer (Train V2) whose two workers train with the
    DDP strategy on Ray's gloo process group and report FID back to Tune."""
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path / "ddp.yaml", name="ddp", resources={"workers": 2, "cpus_per_worker": 0.5},
                       overrides={**TINY, "train.batch_size": 8, "train.steps": 10, "eval.every": 10,
                                  "dist.strategy": "ddp", "tracking.experiment": "rgan-sweep-ddp"})
    result = run_sweep(load_sweep(path), verbose=0)
    (row,) = result.rows
    assert (row.outcome, row.step) == ("completed", 10) and row.best_fid is not None
    config = yaml.safe_load((tmp_path / "runs/sweeps/ddp/trials" / row.trial_id / "config.yaml").read_text())
    assert config["dist"]["strategy"] == "ddp"
    client, runs = mlflow_runs(tmp_path / "mlflow.db", "rgan-sweep-ddp")
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.data.tags["rgan.world_size"] == "2" and child.data.tags["rgan.strategy"] == "ddp"


def test_command_line_overrides_beat_the_sweep_file():
    spec = load_sweep(SWEEPS / "smoke.yaml", ["train.steps=40", "eval.num_samples=16"])
    assert (spec.base_config.train.steps, spec.base_config.eval.num_samples) == (40, 16)  # the file says 20, 8
    assert make_scheduler(spec)._max_t == 40
    with pytest.raises(ConfigError, match="overrides: unknown key train.step"):
        load_sweep(SWEEPS / "smoke.yaml", ["train.step=40"])


@pytest.mark.slow
def test_pbt_restarts_the_worse_trial_from_the_better_ones_checkpoint(ray_local, tmp_path, monkeypatch):
    """Synchronous PBT, 2 trials: at step 10 the untrained one (lr_d 1e-6) takes the other's checkpoint and
    a perturbed copy of its lr_d, which its optimizer really uses from then on."""
    import torch

    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path / "pbt.yaml", name="pbt", max_concurrent_trials=2,
                       space={"train.lr_d": {"grid": [5.0e-2, 1.0e-6]}, "train.lr_g": 5.0e-2},
                       scheduler={"name": "pbt", "perturbation_interval": 10, "quantile_fraction": 0.5,
                                  "resample_probability": 0.0, "synch": True,
                                  "mutations": {"train.lr_d": {"loguniform": [1.0e-4, 1.0e-1]}}},
                       overrides={**TINY, "tracking.experiment": "rgan-sweep-pbt"})
    result = run_sweep(load_sweep(path), verbose=0)
    assert [r.step for r in result.rows] == [20, 20] and all(r.outcome == "completed" for r in result.rows)
    exploited = next(r for r in result.rows if r.trial_id.endswith("_00001"))
    assert exploited.restored_from_step == 10
    new_lr = exploited.overrides["train.lr_d"]
    assert new_lr == pytest.approx(0.04) or new_lr == pytest.approx(0.06)  # 0.05 x 0.8 or x 1.2
    ckpt_dir = tmp_path / "runs/sweeps/pbt/trials" / exploited.trial_id / "checkpoints"
    state = torch.load(ckpt_dir / (ckpt_dir / "latest").read_text(), weights_only=True)
    assert state["step"] == 20 and state["model"]["opt_d"]["param_groups"][0]["lr"] == pytest.approx(new_lr)


def test_on_a_cluster_a_localhost_mlflow_server_is_named_by_the_head_nodes_address(capsys):
    from rgan_dist.sweep.driver import _cluster_uri

    uri = _cluster_uri("http://localhost:5000")
    assert uri.startswith("http://") and uri.endswith(":5000") and "localhost" not in uri
    assert _cluster_uri("http://mlflow.example.org:5000") == "http://mlflow.example.org:5000"
    assert _cluster_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert "trials on other nodes cannot log to it" in capsys.readouterr().err
    # a SQLite file in the sweep's shared storage folder is reachable from every node
    assert _cluster_uri("sqlite:////mnt/shared/mlflow.db", "/mnt/shared") == "sqlite:////mnt/shared/mlflow.db"
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------- on a cluster (--address)


def test_a_cluster_sweep_without_storage_is_a_one_line_error_before_ray(tmp_path, monkeypatch):
    """Trials on other nodes cannot reach a folder of the driver's machine: `--address` needs `storage`.
    (An address where no Ray listens: a regression must not run trials on some cluster `auto` would find.)"""
    monkeypatch.chdir(tmp_path)
    # The CLI in a process of its own, as a user runs it: this test process may hold another test's Ray
    # connection, whose workers' log lines would land in the same stderr.
    p = subprocess.run([sys.executable, "-m", "launcher.sweep", "--config", str(SWEEPS / "smoke.yaml"),
                        "--address", "127.0.0.1:1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    err = p.stderr
    assert p.returncode == 2, err
    assert err.startswith("rgan sweep: error: rgan sweep --address: sweep ") and "sets no storage" in err
    assert "storage=/mnt/shared/sweeps" in err and err.count("\n") == 1, err
    # the library refuses too, before connecting to anything
    with pytest.raises(UsageError, match="sets no storage"):
        run_sweep(load_sweep(SWEEPS / "smoke.yaml"), address="127.0.0.1:1")


def test_storage_on_the_command_line_holds_the_sweeps_outputs(tmp_path):
    """A key without a dot is a sweep setting; with storage a folder, the trial outputs, the table and Ray's
    experiment are all in <storage>/<name> (an explicit out_dir still wins)."""
    spec = load_sweep(SWEEPS / "smoke.yaml", [f"storage={tmp_path / 'shared'}"], cluster=True)
    assert spec.storage == str(tmp_path / "shared") and spec.shared_folder == spec.storage
    assert spec.out_dir == str(tmp_path / "shared" / "smoke") == spec.experiment_path
    spec = load_sweep(SWEEPS / "smoke.yaml", ["storage=s3://bucket/sweeps"], cluster=True)
    assert spec.experiment_path == "s3://bucket/sweeps/smoke" and spec.shared_folder == ""
    spec = load_sweep(SWEEPS / "smoke.yaml", [f"storage={tmp_path}", f"out_dir={tmp_path / 'o'}"])
    assert spec.out_dir == str(tmp_path / "o")
    with pytest.raises(ConfigError, match="command line: unknown key 'storag'"):
        load_sweep(SWEEPS / "smoke.yaml", ["storag=/x"])


def test_on_a_cluster_the_data_must_be_shared_and_the_command_line_beats_the_space(tmp_path):
    """A relative data.shards names a folder of the driver's machine: an error on a cluster. The command
    line's data.shards wins over the file, its space included (a dotted entry or inside a group)."""
    shared = [f"storage={tmp_path}"]
    path = write_sweep(tmp_path / "data.yaml", overrides={**TINY, "data.shards": "data/cifar10"})
    with pytest.raises(ConfigError) as e:
        load_sweep(path, shared, cluster=True)
    assert "data.shards: 'data/cifar10' is relative to this machine" in str(e.value) and "\n" not in str(e.value)
    assert load_sweep(path).base_config.data.shards == os.path.abspath("data/cifar10")  # local: resolved here
    spec = load_sweep(path, [*shared, "data.shards=/mnt/shared/cifar10"], cluster=True)
    assert spec.base_config.data.shards == "/mnt/shared/cifar10"
    assert load_sweep(path, [*shared, "data.shards=s3://b/cifar10"], cluster=True).base_config.data.shards \
        == "s3://b/cifar10"
    spaced = write_sweep(tmp_path / "spaced.yaml", space={
        "data.shards": {"grid": ["data/a", "data/b"]},
        "setup": {"grid": [{"label": "x", "data.shards": "data/c", "train.lr_d": 1e-3}, {"train.lr_d": 1e-4}]}})
    with pytest.raises(ConfigError, match="space.data.shards: 'data/a' is relative"):
        load_sweep(spaced, shared, cluster=True)
    spec = load_sweep(spaced, [*shared, "data.shards=/mnt/shared/x"], cluster=True)
    assert "data.shards" not in spec.space and "data.shards" not in spec.varied_keys
    trials = planned_trials(spec)
    assert len(trials) == 2 and all("data.shards" not in trial_overrides(t) for t in trials)
    assert {t["setup"].get("label") for t in trials} == {"x", None}


def test_on_a_cluster_repo_paths_resolve_in_each_trial_against_its_own_checkout(tmp_path):
    """A DeepSpeed JSON named relative to the checkout stays relative on the driver; the trial resolves it
    against the code it runs (on a cluster: the checkout the driver shipped)."""
    from rgan_dist.sweep import TrialSetup
    from rgan_dist.sweep.spec import REPO_ROOT

    rel = "configs/deepspeed/zero2.json"
    assert (REPO_ROOT / rel).is_file()
    spec = load_sweep(SWEEPS / "smoke.yaml", [f"storage={tmp_path}", "dist.strategy=deepspeed",
                                                     f"dist.deepspeed_config={rel}"], cluster=True)
    assert spec.base_config.dist.deepspeed_config == rel
    setup = TrialSetup(sweep="smoke", base=spec.base_config.to_dict(), out_dir=spec.out_dir)
    cfg = setup.trial_config("abc_00000", {"loss.name": "rsgan"}, None)
    assert cfg.dist.deepspeed_config == str(REPO_ROOT / rel)


def test_the_driver_ships_its_checkout_unless_the_ray_job_already_did():
    from rgan_dist.sweep.driver import JOB_CONFIG_ENV, code_runtime_env
    from rgan_dist.sweep.spec import REPO_ROOT

    assert code_runtime_env({}) == {"working_dir": str(REPO_ROOT)}
    job = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}, "metadata": {}})}
    assert code_runtime_env(job) is None  # `ray job submit --working-dir .`: this process runs from that copy
    bare_job = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {}, "metadata": {}})}
    assert code_runtime_env(bare_job) == {"working_dir": str(REPO_ROOT)}
    ignored = (ROOT / ".rayignore").read_text().split()
    assert {".git", "/data/"} <= set(ignored)  # what the upload leaves out besides .gitignore's run outputs


def test_data_root_places_every_relative_shard_path_of_the_space_on_shared_storage(tmp_path):
    """paper_cat varies data.shards with the resolution (data/cat64, ...): data_root=/mnt/shared puts all of
    them on the shared mount, so one command line serves the whole space on a cluster."""
    spec = load_sweep(SWEEPS / "paper_cat.yaml", [f"storage={tmp_path}", "data_root=/mnt/shared"], cluster=True)
    shards = {entry["data.shards"] for entry in spec.space["size"]["grid"]}
    assert shards == {"/mnt/shared/data/cat64", "/mnt/shared/data/cat128", "/mnt/shared/data/cat256"}, shards
    with pytest.raises(ConfigError, match="data_root=/mnt/shared on the command line"):
        load_sweep(SWEEPS / "paper_cat.yaml", [f"storage={tmp_path}"], cluster=True)


def test_with_an_object_store_as_storage_the_table_is_copied_beside_the_experiment(tmp_path):
    """s3://... storage: the table goes there too (pyarrow's filesystems, as Ray's storage; file:// here, an
    object-store URI that needs no server). A folder storage holds out_dir already: nothing to copy."""
    from rgan_dist.sweep.driver import copy_to_storage

    spec = load_sweep(SWEEPS / "smoke.yaml", [f"storage=file://{tmp_path / 'store'}", f"out_dir={tmp_path / 'o'}"])
    _, files = write_results([], spec)
    assert copy_to_storage(files, spec) == [f"file://{tmp_path}/store/smoke/{f.name}" for f in files]
    assert (tmp_path / "store" / "smoke" / "results.md").read_text() == (tmp_path / "o" / "results.md").read_text()
    assert copy_to_storage(files, load_sweep(SWEEPS / "smoke.yaml", [f"storage={tmp_path / 'shared'}"])) == []


def test_the_final_table_waits_for_the_trials_output_to_stop():
    """Issue 19: trial lines kept arriving after the final table. Ray hands the driver the workers' output in
    batches through its dispatcher; `TrialOutput.settle` returns only after they have stopped for `quiet_s`."""
    import threading
    import time

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from rgan_dist.sweep.driver import TrialOutput

    output = TrialOutput(quiet_s=0.5, limit_s=10.0).start()
    sent: list[float] = []

    def trial_lines() -> None:  # a trial still printing for 1.5 s after the sweep "returned"
        for _ in range(6):
            time.sleep(0.25)
            sent.append(time.monotonic())
            dispatcher.emit({"lines": ["(trial pid=1) rgan: step 20"], "pid": 1, "ip": "x", "is_err": False})

    thread = threading.Thread(target=trial_lines)
    thread.start()
    output.settle()
    done = time.monotonic()
    thread.join()
    assert len(sent) == 6 and done >= sent[-1] + 0.5, (done, sent)
    assert all(name != TrialOutput.NAME for name, _ in dispatcher.handlers)  # stopped listening
    t0 = time.monotonic()
    TrialOutput(quiet_s=5.0, limit_s=10.0).start().settle(0.0)  # Ctrl-C: no wait
    assert time.monotonic() - t0 < 0.5


def test_a_sweep_with_a_dead_trial_does_not_exit_0_silently():
    """Issue 19: a Ray worker died (SIGABRT) and the sweep exited 0 without a word. Now any trial that ended
    without a result fails the sweep (exit 1, one line naming them); a trial Tune retried to the end is said."""
    from launcher.sweep import outcome_summary
    from rgan_dist.sweep import TrialRow

    def row(name, outcome, restored=0, error=""):
        return TrialRow(trial_id=name, name=name, params={}, overrides={}, best_fid=1.0, final_fid=1.0, step=20,
                        outcome=outcome, restored_from_step=restored, error=error)

    assert outcome_summary([row("a", "completed"), row("b", "stopped early")]) == ([], 0)
    lines, code = outcome_summary([row("a", "completed", restored=10), row("b", "completed")])
    assert code == 0 and lines == ["rgan sweep: trial a failed and was retried from its checkpoint at step 10; it "
                                   "ended completed"]
    lines, code = outcome_summary([row("a", "completed"), row("b", "error", error="RayActorError: died\nmore")])
    assert code == 1 and lines == ["rgan sweep: error: 1 of 2 trial(s) ended without a result (b); first: error: "
                                   "RayActorError: died"]


def test_a_best_trial_without_its_logged_model_is_said_not_skipped(tmp_path, capsys):
    """The sweep marks the best trial's logged generator; a completed best trial whose model never reached
    MLflow (its upload failed, or Tune ended the trial first) is one warning line naming its folder, where
    before nothing was said. A trial stopped early has no model by design: no warning."""
    from rgan_dist.sweep.parent import STATE_FILE, ParentRun
    from rgan_dist.sweep.results import TrialRow

    class Run:
        def __init__(self, tags):
            self.data = type("D", (), {"tags": tags})()

    class Client:
        def __init__(self, tags):
            self.tags, self.calls = tags, []

        def get_run(self, run_id):
            return Run(self.tags)

        def set_tag(self, run_id, key, value):
            self.calls.append(("run", run_id, key, value))

        def set_logged_model_tags(self, model_id, tags):
            self.calls.append(("model", model_id, tags))

    def mark(tags, outcome):
        parent = object.__new__(ParentRun)  # no MLflow: only what _mark_best_model reads
        parent.client, parent.sweep, parent.state = Client(tags), "s1", tmp_path / STATE_FILE
        parent._mark_best_model(TrialRow("t_00002", "s1-t2", {}, {}, 10.0, 10.0, 8, outcome, mlflow_run_id="r2"))
        return parent.client.calls, capsys.readouterr().err

    calls, err = mark({"rgan.generator_model_id": "m-9"}, "completed")
    assert calls == [("run", "r2", "rgan.sweep.best", "s1"), ("model", "m-9", {"rgan.sweep.best": "s1"})]
    assert err == ""
    calls, err = mark({}, "completed")
    assert calls == [("run", "r2", "rgan.sweep.best", "s1")]
    assert err.count("\n") == 1 and "best trial t_00002 (MLflow run r2) has no logged generator model" in err
    assert f"rgan export --checkpoint {tmp_path / 'trials' / 't_00002'} --out G.safetensors" in err
    assert mark({}, "stopped early")[1] == ""
    parent = object.__new__(ParentRun)  # a trial whose tracker never got a run: no id to tag, said
    parent.client, parent.sweep, parent.state = Client({}), "s1", tmp_path / STATE_FILE
    parent._mark_best_model(TrialRow("t_00003", "s1-t3", {}, {}, 9.0, 9.0, 8, "completed"))
    err = capsys.readouterr().err
    assert parent.client.calls == [] and "best trial t_00003 reported no MLflow run" in err


def test_a_trial_says_when_mlflow_did_not_flush_before_its_report(capsys):
    """Tune may end a trial's process once it has the report: if the tracker has not flushed by then, the
    trial says so in one line (its run may miss its last records or its model) instead of going quiet."""
    from rgan_dist.sweep.trial import Reporter, TrialHooks

    class Tracker:
        def __init__(self, flushed):
            self.flushed, self.waited, self.run_id = flushed, [], None

        def flush(self, timeout_s):
            self.waited.append(timeout_s)
            self.run_id = "r-late"  # created by the worker thread after the trial started
            return self.flushed

    class Trainer:
        step = 3  # before the last step: only the flush is at stake

    cfg = load_config(None, ["train.steps=10"])
    for flushed, lines in ((True, 0), (False, 1)):
        reporter = Reporter(lambda *a, **k: None, object, trial_id="t_00001")
        tracker = Tracker(flushed)
        TrialHooks(cfg, reporter, tracker, None, lambda: None)
        reporter.before_send(Trainer(), None)
        err = capsys.readouterr().err
        assert tracker.waited == [120.0] and err.count("\n") == lines
        assert reporter.run_id == "r-late"  # the report carries the run the store holds now
        assert flushed or "trial t_00001: MLflow uploads still pending after 120s" in err
