"""Paper presets name their runs after the loss variant: a `loss.name=` override gets its own run folder and
MLflow run instead of writing into the preset's default one."""

from __future__ import annotations

import pytest
from conftest import ROOT

from launcher.cli import main
from rgan_dist.config import load_config
from rgan_dist.errors import ConfigError

CIFAR = ROOT / "configs" / "paper" / "cifar10.yaml"
# The preset's model and loop, shrunk to seconds on CPU (cnn32 keeps its 32x32; the digits are embedded).
TINY_CIFAR = ["model.width=8", "model.z_dim=16", "train.batch_size=4", "train.steps=1", "train.progress=false",
              "train.sample_every=0", "checkpoint.every=0", "eval.every=0", "data.shards=sklearn:digits",
              "train.log_every=1"]


def test_paper_preset_overrides_train_into_distinct_folders_and_mlflow_runs(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path / "cache"))
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    variants = [[], ["loss.name=rsgan"], ["loss.name=rsgan", "loss.penalty=wgan-gp", "model.d_batch_norm=false"]]
    for extra in variants:
        assert main(["train", "--config", str(CIFAR), *TINY_CIFAR, f"tracking.mlflow_uri={db}",
                     "tracking.experiment=names", *extra]) == 0, capsys.readouterr().err
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["cifar10-rasgan", "cifar10-rsgan", "cifar10-rsgan-wgan-gp"]
    for name in folders:  # each folder holds exactly its own run's one step
        assert len((tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()) == 1
    client = MlflowClient(tracking_uri=db)
    runs = client.search_runs([client.get_experiment_by_name("names").experiment_id])
    assert sorted(r.info.run_name for r in runs) == folders
    assert {r.data.params["run.name"] for r in runs} == set(folders)  # the stored config holds the final name


def test_run_name_placeholders_and_errors():
    assert load_config(CIFAR, ["run.name=x-{loss.name}-n{train.n_dis}"]).run.name == "x-rasgan-n1"
    again = load_config(None, [f"{k}={v}" for k, v in load_config(CIFAR).flat().items()
                               if k == "run.name"])
    assert again.run.name == "cifar10-rasgan"  # an expanded name reloads unchanged (checkpoints, MLflow)
    with pytest.raises(ConfigError, match=r"run.name='a-\{bogus\}': unknown placeholder \{bogus\}") as e:
        load_config(CIFAR, ["run.name=a-{bogus}"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown placeholder {train.betas}"):
        load_config(CIFAR, ["run.name=a-{train.betas}"])
