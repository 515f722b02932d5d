"""S3 for real: shards streamed from `s3://`, a Ray sweep whose `storage` is `s3://`, MLflow artifacts in a
bucket, all against a local S3 server (moto's `moto_server`, which speaks the S3 HTTP API).

Nothing here passes an endpoint in code: every client on these paths (botocore/boto3 for MLflow,
s3fs/aiobotocore for the shard reader, pyarrow's S3FileSystem for Ray storage) reads AWS_ENDPOINT_URL
from the environment, exactly as it would read it for MinIO or another S3-compatible store (README, "S3
and other object stores"). So the tests set only environment variables, and each then lists the bucket
to prove the bytes went there (an exit code alone would not).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_resume_shards as resume_shards
from conftest import DEMO, TINY, free_port
from jobs import assert_same_training_state, ckpt, image_steps, job_env, ok, run_job, torchrun
from test_sweep import TINY as SWEEP_TRIAL
from test_sweep import write_sweep

from rgan_dist.config import load_config
from rgan_dist.engine.loop import train
from rgan_dist.mlflow_view import EXPERIMENT_KIND
from rgan_dist.tracking import experiment_id, resolve_store

# The 24-digit shard set and the straight 2-rank run over it from local disk (the S3 run must match it).
shards, straight_two_ranks, STEPS = resume_shards.shards, resume_shards.straight_two_ranks, resume_shards.STEPS
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server: the variables a user sets for MinIO too."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _moto_server() -> str:
    """This interpreter's `moto_server` (a pyenv shim on PATH may point at another environment)."""
    script = Path(sys.executable).parent / "moto_server"
    return str(script) if script.is_file() else shutil.which("moto_server") or "moto_server"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One moto S3 server on a free 127.0.0.1 port for the whole session, in its own process group."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([_moto_server(), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"moto_server exited: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"moto_server not answering: {log.read_text()[-2000:]}"
                time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket, and this process's environment (inherited by every job a test starts) pointed at the
    server."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    name = f"rgan-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


# ------------------------------------------------------------------------------------------ shards


@pytest.mark.slow
@pytest.mark.timeout(600)  # > its jobs' own timeouts: 3 x 180 s with the reference run
def test_two_ranks_stream_shards_from_s3_and_resume_exactly(tmp_path, bucket, s3_server, shards, straight_two_ranks):
    """The shards of test_resume_shards, uploaded with their manifest: a 2-rank DDP run that reads them as an
    `s3://` brace list (the manifest beside them gives the counts exact resume needs), stopped mid-epoch and
    resumed, ends bitwise equal to the straight run that read the same shards from local disk."""
    client = s3_server.client()
    for f in sorted(shards.iterdir()):
        client.upload_file(str(f), bucket, f"digits/{f.name}")
    tars = sorted(f.name for f in shards.glob("*.tar"))
    assert len(tars) == 3
    assert set(s3_server.keys(bucket, "digits/")) == {f"digits/{n}" for n in [*tars, "manifest.json"]}
    spec = f"s3://{bucket}/digits/{tars[0][:-len('000000.tar')]}{{000000..000002}}.tar"

    ok(torchrun(tmp_path, "dist.strategy=ddp", *resume_shards.overrides(spec), f"train.steps={STEPS // 2}"))
    half = ckpt(tmp_path, STEPS // 2)
    assert [(r["data"]["epoch"], r["data"]["batch"]) for r in half["ranks"]] == [(2, 2), (2, 2)]  # mid-epoch
    resumed = ok(torchrun(tmp_path, "dist.strategy=ddp", *resume_shards.overrides(spec), f"train.steps={STEPS}",
                          "--resume", "auto"))
    assert f"at step {STEPS // 2}" in resumed
    assert_same_training_state(straight_two_ranks, ckpt(tmp_path, STEPS))


@pytest.mark.slow
def test_s3_shards_are_verified_and_a_missing_manifest_is_named(tmp_path, bucket, s3_server, shards):
    """Shards in a bucket are checked against their manifest as they stream (a zeroed sha256 is one line
    naming the s3:// shard); a brace list without a manifest beside it says which URL was not found."""
    import json

    from data_pipeline import make_batch_iterator
    from data_pipeline.errors import DataError

    client = s3_server.client()
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    for f in sorted(shards.glob("*.tar")):
        client.upload_file(str(f), bucket, f"lying/{f.name}")
        client.upload_file(str(f), bucket, f"bare/{f.name}")
    client.put_object(Bucket=bucket, Key="lying/manifest.json", Body=json.dumps(manifest).encode())
    name = manifest["shards"][1]["url"]
    lying = make_batch_iterator(f"s3://{bucket}/lying/manifest.json", batch_size=4, rank=0, world_size=1, workers=0)
    with pytest.raises(DataError) as exc, lying as it:
        for _ in range(2 * it.batches_per_epoch):
            next(it)
    assert str(exc.value).startswith(f"shard s3://{bucket}/lying/{name} does not match its manifest: sha256 ")
    with pytest.raises(DataError) as exc:
        make_batch_iterator(f"s3://{bucket}/bare/{name[:-len('000000.tar')]}{{000000..000002}}.tar", batch_size=4,
                            rank=0, world_size=1)
    assert f"cannot read manifest s3://{bucket}/bare/manifest.json: not found (404)" in str(exc.value)
    assert "\n" not in str(exc.value) and "samples_per_epoch" not in str(exc.value)


# ------------------------------------------------------------------------------------------ MLflow


def test_artifact_root_url_is_kept_as_a_url(tmp_path):
    """An s3:// artifact root must reach MLflow as a URL (a Path would make it the local folder `s3:/b`)."""
    assert resolve_store("", tmp_path, artifact_root="s3://b/mlruns") == (f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                                        "s3://b/mlruns")
    assert resolve_store("http://h:5000", artifact_root="s3://b/x/") == ("http://h:5000", "s3://b/x/")
    assert resolve_store("", tmp_path, artifact_root="art")[1] == str(tmp_path / "art")
    created = {}

    class Client:
        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name, artifact_location=None, tags=None):  # MlflowClient's signature
            created[name] = artifact_location
            assert tags == EXPERIMENT_KIND  # made in MLflow's model-training kind (rgan_dist.mlflow_view)
            return "1"

    experiment_id(Client(), "e", "s3://b/x/")
    experiment_id(Client(), "f", tmp_path / "art")
    assert created == {"e": "s3://b/x/e", "f": str(tmp_path / "art" / "f")}


@pytest.mark.slow
def test_mlflow_artifacts_land_in_the_bucket(tmp_path, bucket, s3_server, monkeypatch):
    """A run tracked in a local SQLite store with `tracking.artifact_root=s3://...`: its config, sample grids and
    checkpoint are objects in the bucket (byte for byte), none in a local mlruns/, and MLflow reads them back."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO, [*TINY, "train.batch_size=4", "train.steps=4", "train.sample_every=2",
                             "checkpoint.every=0", "tracking.log_checkpoints=final", "tracking.experiment=s3",
                             f"tracking.artifact_root=s3://{bucket}/mlruns", f"run.out_dir={tmp_path / 'run'}"])
    assert train(cfg).step == 4

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("s3")
    assert exp.artifact_location == f"s3://{bucket}/mlruns/s3"
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(f"s3://{bucket}/mlruns/s3/")
    prefix = f"mlruns/s3/{run.info.run_id}/artifacts/"
    keys = {k[len(prefix):] for k in s3_server.keys(bucket, prefix)}
    assert {"config.yaml", "checkpoints/ckpt-00000004.pt"} <= keys, keys
    assert image_steps(keys, "samples") == [0, 2, 4], keys  # the grids on the image card (step 0: where it opens)
    (grid,) = [k for k in keys if k.startswith("images/samples+step+4+") and k.endswith(".png")
               and "+compressed" not in k]
    body = s3_server.client().get_object(Bucket=bucket, Key=prefix + "config.yaml")["Body"].read()
    assert body == (cfg.out_dir / "config.yaml").read_bytes()
    assert not (tmp_path / "mlruns").exists()  # nothing went to the local default
    got = client.download_artifacts(run.info.run_id, grid, str(tmp_path / "dl"))
    assert Path(got).read_bytes() == s3_server.client().get_object(Bucket=bucket, Key=prefix + grid)["Body"].read()


# ------------------------------------------------------------------------------------------ Ray storage


@pytest.mark.slow
def test_sweep_with_s3_storage_keeps_its_experiment_and_trial_checkpoints_in_the_bucket(tmp_path, bucket, s3_server):
    """`rgan sweep` on a fresh local Ray with `storage: s3://...`: Tune (pyarrow's S3 filesystem) writes the
    experiment state and the trial's checkpoints and results to the bucket; with `tracking.artifact_root` on
    S3 too, the parent run's table and the trial's run (logged from a Ray worker) keep their artifacts there."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    path = write_sweep(tmp_path / "s3.yaml", name="s3", storage=f"s3://{bucket}/sweeps", max_failures=0,
                       out_dir=str(tmp_path / "sweep"),
                       overrides={**SWEEP_TRIAL, "tracking.mlflow_uri": f"sqlite:///{db}",
                                  "tracking.experiment": "s3-sweep", "tracking.artifact_root": f"s3://{bucket}/mlruns"})
    proc = run_job([sys.executable, "-m", "launcher.sweep", "--config", str(path), "--num-cpus", "1",
                    "--verbose", "0"], timeout=300, env=job_env(RAY_DEDUP_LOGS="0"))
    out = ok(proc)
    keys = s3_server.keys(bucket, "sweeps/s3/")
    assert any(k.startswith("sweeps/s3/experiment_state") for k in keys), keys
    (trial,) = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("trial_")}
    files = {k.split("/", 3)[3] for k in keys if k.split("/")[2] == trial}
    assert {"result.json", "params.json"} <= files, files
    # the trial checkpoints at its eval steps (10 and 20), each with the training checkpoint inside
    assert {f.split("/")[0] for f in files if f.startswith("checkpoint_")} == {"checkpoint_000000", "checkpoint_000001"}
    assert any(f.startswith("checkpoint_000001/") and f.endswith(".pt") for f in files), files
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [r["step"] for r in rows] == [20] and "completed" in {r["outcome"] for r in rows}, out[-3000:]

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("s3-sweep")
    assert exp.artifact_location == f"s3://{bucket}/mlruns/s3-sweep"
    found = client.search_runs([exp.experiment_id])
    runs = {r.data.tags.get("mlflow.parentRunId", "parent"): r.info.run_id for r in found}  # parent id -> child
    assert len(found) == len(runs) == 2, runs
    artifacts = set(s3_server.keys(bucket, "mlruns/s3-sweep/"))
    assert f"mlruns/s3-sweep/{runs['parent']}/artifacts/results.md" in artifacts, artifacts
    assert f"mlruns/s3-sweep/{runs[runs['parent']]}/artifacts/config.yaml" in artifacts, artifacts
