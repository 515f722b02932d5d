"""MLflow tracking against a real `mlflow server` on 127.0.0.1, and what happens when it is not there.

The server runs in its own process group (uvicorn spawns workers) with a SQLite backend and a proxied
artifact folder in tmp_path, and is always killed at the end. The FID test uses the real Inception
network on tiny N, so it costs ~1 minute on a 2-core CPU; the others need no network.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import DEMO, ROOT, TINY, free_port

from rgan_dist.config import dump_config, load_config
from rgan_dist.engine.loop import Trainer, train
from rgan_dist.run_info import git_state
from rgan_dist.tracking import (
    HTTP_DEFAULTS,
    JsonlTracker,
    MlflowTracker,
    Tracker,
    bound_http_retries,
    make_tracker,
    resolve_store,
)

BASE = [*TINY, "train.batch_size=8", "train.log_every=1", "train.sample_every=3", "checkpoint.every=0"]
LOGGED = {"d_loss", "g_loss", "d_real", "d_fake", "penalty", "img_per_s", "skipped_samples", "bad_steps",
          "d_grad_norm", "g_grad_norm"}


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "server.db"
        self.artifacts = root / "server-artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner
        with open(root / "server.log", "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}",
                 "--artifacts-destination", str(self.artifacts)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server not answering after {timeout}s")

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and its uvicorn worker): a crash, not a shutdown."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    try:
        s.wait_ready()
        yield s
    finally:
        s.kill()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Reference statistics and the default store go to tmp_path, never to the user's folders."""
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def _cfg(tmp_path: Path, *extra: str):
    return load_config(DEMO, [*BASE, f"run.out_dir={tmp_path}/run", *extra])


def _jsonl(cfg) -> list[dict]:
    return [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]


def _only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _image_steps(files: set[str], key: str) -> list[int]:
    """The steps of the full-size images `MlflowClient.log_image(key=key, step=...)` stored: it writes
    `images/<key>+step+<step>+timestamp+<ms>+<uuid>.png` (and a `+compressed.webp` thumbnail) per call."""
    prefix = f"images/{key.replace('/', '~')}+step+"
    return [int(f[len(prefix):].split("+")[0]) for f in files if f.startswith(prefix) and f.endswith(".png")
            and "+compressed" not in f]


def _git_head() -> str | None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() if head.returncode == 0 else None


@pytest.mark.slow
def test_run_on_a_real_server_holds_params_metrics_fid_samples_and_config(tmp_path, server):
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path, "train.steps=6", "eval.every=3", "eval.num_samples=8", "eval.batch_size=8",
               f"tracking.mlflow_uri={server.url}", "tracking.experiment=e2e")
    heads = {_git_head()}
    result = train(cfg)
    heads.add(_git_head())  # someone may commit while the test runs: the tag names one of the two
    assert result.step == 6

    client = MlflowClient(tracking_uri=server.url)
    run = _only_run(client, "e2e")
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.run.name
    flat = cfg.flat()
    assert set(run.data.params) == set(flat)
    assert run.data.params["train.betas"] == json.dumps(cfg.train.betas)
    assert run.data.params["eval.every"] == "3" and run.data.params["model.resolution"] == "16"

    tags = run.data.tags
    assert tags["rgan.strategy"] == "single" and tags["rgan.world_size"] == "1" and tags["rgan.device"] == "cpu"
    assert tags["version.torch"] == torch.__version__ and "version.mlflow" in tags and "version.rgan-dist" in tags
    if None not in heads:
        assert tags["mlflow.source.git.commit"] in heads
    assert len(tags["fid.network_sha256"]) == 64 and tags["fid.resize"] == "tf1-bilinear"
    assert tags["fid.num_samples"] == "8" and tags["fid.reference_samples"] == "8"

    # every training metric at every step, gradient norms included, identical to the JSONL record
    jsonl = _jsonl(cfg)
    for key in LOGGED:
        history = client.get_metric_history(run.info.run_id, f"train/{key}")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6], key
    fid = sorted(client.get_metric_history(run.info.run_id, "eval/fid"), key=lambda m: m.step)
    assert [m.step for m in fid] == [3, 6]
    assert all(0 < m.value < 1e4 for m in fid)
    assert [m.value for m in fid] == [r["fid"] for r in jsonl if "fid" in r]
    assert len(client.get_metric_history(run.info.run_id, "eval/kid")) == 2

    files = set(_artifacts(client, run.info.run_id))
    assert {"config.yaml", "fid/step_0000003.json", "fid/step_0000006.json", "checkpoints/best.pt",
            "checkpoints/ckpt-00000006.pt"} <= files
    assert sorted(_image_steps(files, "samples")) == [0, 3, 6]  # the grids on the image card (it opens on step 0)
    assert {"samples/step_0000000.png", "samples/step_0000003.png", "samples/step_0000006.png"} <= files
    assert any(f.startswith("fid/fid-stats_") and f.endswith("_n8.npz") for f in files)  # reference stats
    got = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl")))
    assert got.read_text() == dump_config(cfg)
    record = json.loads(Path(client.download_artifacts(run.info.run_id, "fid/step_0000006.json",
                                                       str(tmp_path / "dl"))).read_text())
    assert record["fid"] == fid[1].value and record["n_a"] == 8 and record["network_sha256"] == tags[
        "fid.network_sha256"]
    # proxied uploads: the files sit in the server's artifact destination, not in the client's folders
    assert list(server.artifacts.rglob("samples+step+6+*.png"))


def test_training_survives_the_server_dying_mid_run(tmp_path, server, capfd):
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path, "train.steps=8", "eval.every=3", f"tracking.mlflow_uri={server.url}",
               "tracking.experiment=crash")
    killed_at: dict[str, float] = {}
    trainer: Trainer

    def kill_server(step: int, generator: torch.nn.Module) -> dict[str, float]:
        # Stands in for the evaluator only to act at a known step: everything logged so far is
        # delivered, then the server dies as a crashed host would (SIGKILL, no goodbye).
        if step == 3:
            assert trainer.tracker.flush(60)
            server.kill()
            killed_at["t"] = time.monotonic()
        return {}

    trainer = Trainer(cfg, evaluator=kill_server)
    assert isinstance(trainer.tracker, MlflowTracker)
    try:
        result = trainer.fit()
    finally:
        trainer.tracker.close()
        trainer.strategy.close()
    after_kill = time.monotonic() - killed_at["t"]

    assert result.step == 8 and not result.interrupted
    assert after_kill < 60, f"a dead server stalled training for {after_kill:.0f}s"
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "MLflow" in warnings[0] and "metrics.jsonl" in warnings[0], err[-3000:]
    assert trainer.tracker.failed

    records = _jsonl(cfg)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(set(r) >= LOGGED for r in records)
    # what reached the server before it died is in its store
    stored = MlflowClient(tracking_uri=f"sqlite:///{server.db}")
    run = _only_run(stored, "crash")
    steps = sorted(m.step for m in stored.get_metric_history(run.info.run_id, "train/d_loss"))
    assert steps == [1, 2, 3]


def test_unreachable_server_costs_seconds_and_one_warning(tmp_path, capfd):
    cfg = _cfg(tmp_path, "train.steps=4", f"tracking.mlflow_uri=http://127.0.0.1:{free_port()}",
               "tracking.experiment=nobody")
    t0 = time.monotonic()
    result = train(cfg)
    assert result.step == 4 and time.monotonic() - t0 < 60
    err = capfd.readouterr().err
    assert len([line for line in err.splitlines() if "warning" in line.lower()]) == 1, err[-3000:]
    assert [r["step"] for r in _jsonl(cfg)] == [1, 2, 3, 4]


def test_hung_server_costs_the_bounded_timeout_once(tmp_path, capfd, monkeypatch):
    """A server that accepts connections and never answers: the first request times out, the tracker
    gives up for the rest of the run, training does not wait again."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes connections; nobody ever reads or replies
        cfg = _cfg(tmp_path, "train.steps=4", f"tracking.mlflow_uri=http://127.0.0.1:{silent.getsockname()[1]}")
        t0 = time.monotonic()
        result = train(cfg)
        elapsed = time.monotonic() - t0
    assert result.step == 4 and elapsed < 30, elapsed
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "timed out" in warnings[0].lower(), warnings
    assert [r["step"] for r in _jsonl(cfg)] == [1, 2, 3, 4]


def test_default_store_is_sqlite_in_the_working_directory_and_resume_continues_the_run(tmp_path, capfd):
    from mlflow import MlflowClient

    first = _cfg(tmp_path, "train.steps=2", "tracking.log_checkpoints=final", "tracking.experiment=local")
    train(first)
    out = capfd.readouterr().out
    db = tmp_path / "mlflow.db"
    assert db.is_file() and (tmp_path / "mlruns").is_dir()
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in out

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = _only_run(client, "local")
    files = set(_artifacts(client, run.info.run_id))
    assert "checkpoints/ckpt-00000002.pt" in files and "checkpoints/best.pt" not in files  # policy: final
    assert (tmp_path / "mlruns").joinpath("local").is_dir()  # artifacts in the working directory

    resumed = _cfg(tmp_path, "train.steps=4", "tracking.log_checkpoints=none", "tracking.experiment=local",
                   "checkpoint.resume=auto")
    train(resumed)
    run = _only_run(client, "local")  # the same run, continued
    assert run.info.status == "FINISHED" and run.data.tags["rgan.resumed"] == "true"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/g_loss")) == [1, 2, 3, 4]
    assert run.data.params["train.steps"] == "2" and run.data.tags["resumed.train.steps"] == "4"
    assert "checkpoints/ckpt-00000004.pt" not in set(_artifacts(client, run.info.run_id))  # policy: none


def test_trackers_by_rank_and_setting(tmp_path):
    on = _cfg(tmp_path)
    assert type(make_tracker(on, is_main=False)) is Tracker  # other ranks log nothing
    off = _cfg(tmp_path, "tracking.enabled=false")
    jsonl = make_tracker(off, is_main=True)
    assert type(jsonl) is JsonlTracker
    jsonl.log_metrics({"d_loss": torch.tensor(0.5)}, 7)
    assert _jsonl(off)[0]["d_loss"] == 0.5 and _jsonl(off)[0]["step"] == 7


def test_store_resolution_and_bounded_retries(tmp_path, monkeypatch):
    assert resolve_store("", tmp_path) == (f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlruns"))
    assert resolve_store("http://h:5000") == ("http://h:5000", None)
    assert resolve_store("sqlite:////data/x.db") == ("sqlite:////data/x.db", "/data/mlruns")
    assert resolve_store("sqlite:///rel/x.db", tmp_path) == (f"sqlite:///{tmp_path}/rel/x.db", f"{tmp_path}/rel/mlruns")
    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's choice wins
    values = bound_http_retries()
    assert values["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert values["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_git_commit_comes_from_the_image_env_outside_a_checkout(tmp_path, monkeypatch):
    """The Docker image installs the package without .git; its GIT_COMMIT build argument reaches MLflow's
    git tag through RGAN_GIT_COMMIT. A real checkout still wins over the variable."""
    monkeypatch.setenv("RGAN_GIT_COMMIT", "0123abcd")
    assert git_state(tmp_path) == {"mlflow.source.git.commit": "0123abcd"}  # tmp_path: no checkout
    assert git_state(ROOT)["mlflow.source.git.commit"] == _git_head()
    monkeypatch.setenv("RGAN_GIT_COMMIT", " ")
    assert git_state(tmp_path) == {}
