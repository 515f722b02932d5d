"""A user's own images work on the first try (issue 19, point 4).

Before: `rgan train --config configs/demo.yaml data.shards=<own shards>` died at the first step with a 48-line
`DCGANDiscriminator expects images [B, 1, 32, 32], got [64, 3, 32, 32]` (demo.yaml said `channels: 1`,
`rgan shards` writes RGB), after it had made a run folder and a FAILED MLflow run. Now `model.channels: auto`
takes the channel count from the data, an explicit contradiction is one line before anything exists, and a
resize of the training images is said in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DEMO, TINY

from data_pipeline.sources import SHARD_CHANNELS, spec_channels
from launcher.cli import main
from rgan_dist.config import load_config
from rgan_dist.errors import ConfigError


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory) -> Path:
    """The project's own digits written by `rgan shards` at 8x8: RGB, like every shard set."""
    from data_pipeline.writer import write_shards

    out = tmp_path_factory.mktemp("own") / "shards"
    manifest = write_shards(["sklearn:digits"], out, 8, fmt="png", shard_size=1000, progress=False)
    assert manifest["channels"] == SHARD_CHANNELS == 3
    return out


def test_channels_auto_is_what_the_data_holds(rgb_shards):
    assert load_config(None).model.channels == 1  # the default data, sklearn:digits, is greyscale
    assert load_config(DEMO).model.channels == 1
    assert load_config(DEMO, [f"data.shards={rgb_shards}"]).model.channels == 3
    assert load_config(DEMO, [f"data.shards={rgb_shards / 'manifest.json'}"]).model.channels == 3
    assert spec_channels("s3://bucket/x-{000000..000009}.tar") == 3
    assert load_config(DEMO, ["model.channels=3"]).model.channels == 3  # grey repeated: allowed
    with pytest.raises(ConfigError, match=r"model.channels=1 but data.shards=.* holds RGB images.*auto or 3"):
        load_config(DEMO, [f"data.shards={rgb_shards}", "model.channels=1"])


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_contradiction_is_one_line_before_any_folder_or_mlflow_run(rgb_shards, tmp_path, monkeypatch, capsys,
                                                                    dry_run):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config", str(DEMO), f"data.shards={rgb_shards}", "model.channels=1",
            f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db", f"run.out_dir={tmp_path}/run",
            *(["--dry-run", "--step-time", "0.1"] if dry_run else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.channels=1" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no mlflow.db, no mlruns/


def test_demo_config_trains_on_rgb_shards_and_says_it_resizes(rgb_shards, tmp_path, capsys):
    """The issue's command, small: demo.yaml + RGB shards stored at 8x8 trains at 16x16 (3 channels)."""
    argv = ["train", "--config", str(DEMO), f"data.shards={rgb_shards}", *TINY, "train.steps=2",
            "train.batch_size=8", "data.workers=0", "tracking.enabled=false", f"run.out_dir={tmp_path}/run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    resize = [line for line in out.splitlines() if "model.resolution=16" in line]
    assert resize == [f"rgan: data.shards={rgb_shards} holds 8x8 images; model.resolution=16: centre-cropped and "
                      "resized as read to 16x16 (shards written with --resolution 16 skip this)"], out
    from rgan_dist.checkpoint import load_checkpoint

    assert "channels: 3" in load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000002.pt")["config"]


def test_no_resize_line_when_the_sizes_agree(tmp_path, capsys):
    from data_pipeline.writer import write_shards

    shards = tmp_path / "s16"
    write_shards(["sklearn:digits"], shards, 16, fmt="png", shard_size=1000, progress=False)
    argv = ["train", "--config", str(DEMO), f"data.shards={shards}", *TINY, "train.steps=1", "train.batch_size=8",
            "data.workers=0", "tracking.enabled=false", f"run.out_dir={tmp_path}/run"]
    assert main(argv) == 0
    assert "resized" not in capsys.readouterr().out


def test_configs_derived_from_a_resolved_one_resolve_their_own_data(rgb_shards, tmp_path):
    """A sweep derives every config from a resolved base (`config_from_dict(base.to_dict(...), values)`): the
    base's auto channels (1, from the default sklearn:digits) must not become an explicit 1 that refuses the
    sweep's own RGB shards (it did: `rgan sweep` over demo.yaml + data.shards=<RGB> exited 2)."""
    import yaml

    from rgan_dist.config import config_from_dict, dump_config
    from rgan_dist.sweep import load_sweep

    base = load_config(DEMO)
    assert base.model.channels == 1 and base.to_dict()["model"]["channels"] == 1  # stored resolved
    derived = config_from_dict(base.to_dict(as_given=True), values={"data.shards": str(rgb_shards)})
    assert derived.model.channels == 3
    assert yaml.safe_load(dump_config(derived))["model"]["channels"] == 3  # checkpoints/MLflow: the number
    explicit = load_config(DEMO, ["model.channels=3"])
    assert config_from_dict(explicit.to_dict(as_given=True)).model.channels == 3  # an explicit value stays

    sweep = tmp_path / "own.yaml"
    sweep.write_text(yaml.safe_dump({"name": "own", "base": str(DEMO), "overrides": {"data.shards": str(rgb_shards),
                                                                                    "eval.every": 10},
                                     "space": {"loss.name": {"grid": ["rsgan", "rasgan"]}}}))
    assert load_sweep(sweep).base_config.model.channels == 3
