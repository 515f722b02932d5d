"""The Ray cluster YAMLs pass the validation `ray up` runs before it touches a machine (Ray's defaults
merged by `prepare_config`, then Ray's JSON schema and consistency checks in `validate_config`), and
broken copies of them are rejected by the same code."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
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


def test_aws_workers_get_an_instance_profile_for_s3():
    """Ray's AWS bootstrap gives the head an instance profile, not the workers: trials there reading s3://
    shards or writing s3:// storage need one set in each worker type's node_config."""
    prepared = ray_validate(load("aws-gpu.yaml"))
    for name, t in prepared["available_node_types"].items():
        if name != prepared["head_node_type"]:
            assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_mlflow_store_outlives_ray_down_and_a_second_ray_up_starts_no_second_server(path):
    """The server's store is on the shared mount (not in the container, which `ray down` deletes), the mount
    is the same path in every container, and the start command is guarded by pgrep (head_start_ray_commands
    run again on every `ray up`)."""
    prepared = ray_validate(yaml.safe_load(path.read_text()))
    (cmd,) = [c for c in prepared["head_start_ray_commands"] if "mlflow server" in c]
    assert cmd.startswith("pgrep -f 'mlflow server' >/dev/null || (")
    store = re.search(r"--backend-store-uri (\S+)", cmd).group(1)
    artifacts = re.search(r"--artifacts-destination (\S+)", cmd).group(1)
    for where in (store.removeprefix("sqlite:///"), artifacts):
        assert where.startswith(("/mnt/shared/", "s3://")), where
    assert "-v /mnt/shared:/mnt/shared" in prepared["docker"]["run_options"]


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


# ------------------------------------------------------------------------ a real two-node cluster (Ray Jobs)

MARK = "RGAN_TEST_RAY_CLUSTER"  # in the environment of every process of the test's cluster: how teardown finds them
# Two loopback addresses, one per node: Ray replaces 127.0.0.1 (and localhost) by the machine's outward address,
# and the test's traffic stays on the loopback interface (all of 127.0.0.0/8 is local on Linux).
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


class TwoNodeCluster:
    """A head and a worker node, two `ray start` processes on this machine (each raylet with its own temp dir,
    ports and one CPU), and `ray job submit` against the head's dashboard: the README's cluster recipe.

    Teardown does not run `ray stop`, which ends every Ray process on the machine (another test's, a
    developer's): it ends the processes whose environment carries this cluster's mark, i.e. the nodes'
    daemons and every worker and job they started."""

    def __init__(self, tmp: Path) -> None:
        from conftest import free_port

        self.mark = f"{os.getpid()}-{time.time_ns()}"
        self.port, self.dashboard = free_port(), free_port()
        self.dashboard_url = f"http://{HEAD_IP}:{self.dashboard}"
        # Short paths: Ray's Unix sockets live under the temp dir (a socket path has at most 107 characters).
        self.head_tmp, self.worker_tmp = (Path(tempfile.mkdtemp(prefix=f"rgan-{n}-")) for n in ("head", "worker"))
        bin_dir = str(Path(sys.executable).parent)
        # The nodes' own environment: this venv's `rgan` and `ray`, and no PYTHONPATH to this checkout, so trials
        # can only run this checkout's code if the job ships it (--working-dir).
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        # RAY_AUTH_MODE: Ray turns token auth on for a head whose machine holds ~/.ray/auth_token (any local
        # ray.init writes one) but not for the worker joining it; one machine, one mode.
        self.env.update({MARK: self.mark, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
                         "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled"})
        self.ray = [sys.executable, "-m", "ray.scripts.scripts"]
        node = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats"]
        self.head = [*self.ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
                     f"--dashboard-host={HEAD_IP}",
                     f"--dashboard-port={self.dashboard}", f"--ray-client-server-port={free_port()}",
                     f"--dashboard-agent-listen-port={free_port()}", "--include-dashboard=true",
                     f"--temp-dir={self.head_tmp}", *node]
        self.worker = [*self.ray, "start", f"--address={HEAD_IP}:{self.port}", f"--node-ip-address={WORKER_IP}",
                       f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={self.worker_tmp}", *node]

    def _ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.ray, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        for cmd in (self.head, self.worker):
            p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
            assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    def submit(self, working_dir: Path, entrypoint: str, timeout: float = 480) -> tuple[str, str]:
        """`ray job submit --working-dir DIR -- ENTRYPOINT`, waiting for the end: (status, logs)."""
        job_id = f"rgan-test-{time.time_ns()}"
        p = self._ray("job", "submit", "--address", self.dashboard_url, "--submission-id", job_id,
                      "--working-dir", str(working_dir), "--", *shlex.split(entrypoint), timeout=timeout)
        status = self._ray("job", "status", "--address", self.dashboard_url, job_id).stdout
        return status, p.stdout + p.stderr

    def stop(self) -> None:
        import psutil

        procs = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARK) == self.mark:
                    procs.append(proc)
            except psutil.Error:
                pass
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=15)
        for folder in (self.head_tmp, self.worker_tmp):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def two_nodes(tmp_path):
    cluster = TwoNodeCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_smoke_sweep_runs_on_a_two_node_cluster_through_ray_jobs(two_nodes, tmp_path):
    """The README's recipe on a real (local) two-node Ray cluster: the smoke sweep submitted as a Ray job with
    this checkout as its working_dir, storage on a shared folder. Every trial ends; the two concurrent one-CPU
    trials land on both nodes; trials ran the shipped code; the table, checkpoints, metrics and MLflow runs are
    in the shared folder."""
    shared = tmp_path / "shared"
    status, logs = two_nodes.submit(ROOT, f"rgan sweep --config configs/sweeps/smoke.yaml --address auto "
                                          f"storage={shared} --verbose 0")
    assert re.search(r"Job '.*' succeeded", status), f"{status}\n{logs[-6000:]}"
    out = shared / "smoke"
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4 and {r["outcome"] for r in rows} <= {"completed", "stopped early"}, rows
    assert all(r["best_fid"] is not None and math.isfinite(r["best_fid"]) for r in rows)
    assert len({r["node_id"] for r in rows}) == 2, rows  # both nodes ran trials
    assert (out / "results.md").is_file() and "| # | trial | loss.name | setup |" in logs
    for r in rows:
        trial = out / "trials" / r["trial_id"]
        assert (trial / "metrics.jsonl").is_file() and list((trial / "checkpoints").glob("*.pt")), trial
        assert list((out / f"trial_{r['trial_id']}").glob("checkpoint_*/*.pt")), r  # Ray's copy, in storage
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{shared / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rgan-sweep-smoke")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 5 and len(children) == 4
    assert {c.data.tags["rgan.sweep.node_id"] for c in children} == {r["node_id"] for r in rows}
    for child in children:  # trials imported the checkout the job shipped, not this one
        code = child.data.tags["rgan.sweep.code_dir"]
        assert "runtime_resources" in code and not code.startswith(str(ROOT)), code
