"""The Ray cluster YAMLs pass the validation `ray up` runs before it touches a machine (Ray's defaults
merged by `prepare_config`, then Ray's JSON schema and consistency checks in `validate_config`), and
broken copies of them are rejected by the same code."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "launcher" / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))


def ray_validate(config: dict) -> dict:
    """What `ray up` does to the file first (ray.autoscaler._private.commands._bootstrap_config): fill in
    the provider's defaults, then validate. Provider bootstrapping (cloud API calls) is not run."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_the_two_clusters_exist():
    assert [p.name for p in YAMLS] == ["aws-gpu.yaml", "onprem.yaml"]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_validation(path):
    raw = yaml.safe_load(path.read_text())
    prepared = ray_validate(raw)
    docker = prepared["docker"]
    # Our image's ENTRYPOINT is `rgan`; Ray starts containers with `bash` and must override it.
    assert '--entrypoint=""' in docker["run_options"]
    assert "--gpus all" in docker.get("worker_run_options", [])
    assert any("mlflow server" in c for c in prepared["head_start_ray_commands"])
    assert any("--dashboard-host=0.0.0.0" in c for c in prepared["head_start_ray_commands"])
    for local in prepared["file_mounts"].values():  # local sources exist in the repository (ray up from its root)
        assert (ROOT / local).exists(), local


def test_aws_cluster_has_gpu_workers_and_no_training_on_the_head():
    prepared = ray_validate(load("aws-gpu.yaml"))
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] >= 1 for t in gpu_types)
    assert sum(t.get("max_workers", 0) for t in gpu_types) >= prepared["max_workers"]


def test_onprem_cluster_lists_its_hosts():
    raw = load("onprem.yaml")
    prepared = ray_validate(raw)
    assert prepared["provider"]["type"] == "local"
    ips = raw["provider"]["worker_ips"]
    assert ips and all(re.fullmatch(r"\d+\.\d+\.\d+\.\d+", ip) for ip in [raw["provider"]["head_ip"], *ips])
    assert prepared["max_workers"] == len(ips)  # Ray's local provider keeps every listed host


def _unknown_field(c: dict) -> None:
    c["max_worker"] = 2  # a typo of max_workers


def _wrong_type(c: dict) -> None:
    c["idle_timeout_minutes"] = "ten"


def _run_options_not_a_list(c: dict) -> None:
    c["docker"]["run_options"] = "--gpus all"


def _unknown_docker_field(c: dict) -> None:
    c["docker"]["gpus"] = True


def _head_type_missing(c: dict) -> None:
    c["head_node_type"] = "no-such-type"


def _min_workers_above_max(c: dict) -> None:
    for t in c["available_node_types"].values():
        t["min_workers"] = 5
    c["max_workers"] = 4


def _no_head_ip(c: dict) -> None:
    del c["provider"]["head_ip"]


BROKEN = [
    ("aws-gpu.yaml", _unknown_field, jsonschema.ValidationError),
    ("aws-gpu.yaml", _wrong_type, jsonschema.ValidationError),
    ("aws-gpu.yaml", _run_options_not_a_list, jsonschema.ValidationError),
    ("aws-gpu.yaml", _unknown_docker_field, jsonschema.ValidationError),
    ("aws-gpu.yaml", _head_type_missing, ValueError),
    ("aws-gpu.yaml", _min_workers_above_max, ValueError),
    ("onprem.yaml", _unknown_field, jsonschema.ValidationError),
    ("onprem.yaml", _run_options_not_a_list, jsonschema.ValidationError),
    ("onprem.yaml", _no_head_ip, click.ClickException),  # Ray's local provider aborts
]


@pytest.mark.parametrize(("name", "breaks", "error"), BROKEN,
                         ids=[f"{n}-{f.__name__.strip('_')}" for n, f, _ in BROKEN])
def test_a_broken_copy_is_rejected(tmp_path, name, breaks, error):
    config = load(name)
    ray_validate(config)  # the original passes ...
    broken = copy.deepcopy(config)
    breaks(broken)
    (tmp_path / name).write_text(yaml.safe_dump(broken))  # ... and the broken file, as `ray up` would read it, not
    with pytest.raises(error):
        ray_validate(yaml.safe_load((tmp_path / name).read_text()))
