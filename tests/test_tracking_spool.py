"""Issue 18 item 12: tracking never drops a run's data silently. Bounded retries, a spool in the run folder that
is replayed (later in the run, at its end, or by the job that resumes it), a run marked incomplete when data is
still missing, and a local SQLite store that several writers share without losing records."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import DEMO, ROOT, TINY, free_port
from jobs import image_steps

from rgan_dist.checkpoint import TRACKER_FILES
from rgan_dist.config import load_config
from rgan_dist.sweep.results import TrialRow, _tracking_state, results_table
from rgan_dist.tracking_spool import (
    REJECTED_FILE,
    SPOOL_FILE,
    Outbox,
    Unsendable,
    discard_after,
    incomplete_note,
    spool_path,
    unsent,
    with_retries,
)


class FlakyStore:
    """Stands in for the store: refuses every call while `down`, remembers what it accepted."""

    def __init__(self) -> None:
        self.down = False
        self.got: list[dict] = []
        self.calls = 0

    def send(self, record: dict) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("store unreachable")
        if record["op"] == "artifact" and record["path"] == "gone":
            raise Unsendable("gone no longer exists")
        self.got.append({k: v for k, v in record.items() if k != "session"})


def test_with_retries_is_bounded_and_backs_off():
    sleeps: list[float] = []
    calls = []

    def fail():
        calls.append(1)
        raise OSError("busy")

    with pytest.raises(OSError):
        with_retries(fail, attempts=3, first_delay_s=0.5, sleep=sleeps.append)
    assert len(calls) == 3 and sleeps == [0.5, 1.0]


def test_outbox_spools_what_fails_and_replays_it_in_order_with_nothing_lost(tmp_path):
    store, now, failures = FlakyStore(), [0.0], []
    box = Outbox(tmp_path, store.send, lambda: None, session="a", on_failure=failures.append,
                 clock=lambda: now[0], sleep=lambda s: None)
    assert box.deliver({"op": "metrics", "metrics": [["train/d_loss", 1.0, 1, 1]]})
    store.down = True
    for step in (2, 3):
        assert not box.deliver({"op": "metrics", "metrics": [["train/d_loss", float(step), step, step]]})
    assert len(failures) == 1  # one warning, not one per record
    calls = store.calls
    box.deliver({"op": "tags", "tags": {"x": "1"}})  # in the cool-down: kept without calling the store
    assert store.calls == calls and unsent(tmp_path) == 3
    store.down = False
    now[0] += 1000  # after the cool-down the next record first sends what was kept, in order
    assert box.deliver({"op": "metrics", "metrics": [["train/d_loss", 4.0, 4, 4]]})
    assert [r.get("metrics", [[None, None, None, "tag"]])[0][3] for r in store.got] == [1, 2, 3, "tag", 4, "tag"]
    assert store.got[-1] == {"op": "tags", "tags": {"rgan.tracking": "complete"}}  # whole again, and says so
    assert not spool_path(tmp_path).exists() and not box.failing and incomplete_note(tmp_path) == ""


def test_a_spool_left_by_a_job_is_replayed_by_the_next_and_a_refused_record_is_kept(tmp_path):
    store = FlakyStore()
    store.down = True
    first = Outbox(tmp_path, store.send, lambda: None, session="a", on_failure=lambda e: None, sleep=lambda s: None)
    first.deliver({"op": "params", "params": {"a": "1"}})
    first.deliver({"op": "artifact", "path": "gone", "artifact_path": None})
    first.deliver({"op": "end", "status": "KILLED"})
    assert first.finish() == 3 and "3 record(s) not yet sent" in incomplete_note(tmp_path)
    store.down = False
    second = Outbox(tmp_path, store.send, lambda: None, session="b", on_failure=lambda e: None, sleep=lambda s: None)
    assert second.connect()
    # the first job's end status is not replayed (this job is the run now); the missing file is set aside
    assert store.got == [{"op": "params", "params": {"a": "1"}}]
    assert unsent(tmp_path) == 1 and json.loads((tmp_path / REJECTED_FILE).read_text())["path"] == "gone"
    assert "1 refused by the store" in incomplete_note(tmp_path)


def test_a_resume_discards_spooled_steps_past_its_checkpoint(tmp_path):
    """Each step reaches MLflow once: spooled records of the steps a resume redoes are set aside, not sent."""
    box = Outbox(tmp_path, FlakyStore().send, lambda: (_ for _ in ()).throw(ConnectionError("down")), session="a",
                 on_failure=lambda e: None, sleep=lambda s: None)
    for step in (4, 5, 6):
        box.deliver({"op": "metrics", "metrics": [["train/d_loss", 1.0, 0, step]]})
    box.deliver({"op": "image", "path": "x.png", "key": "samples", "step": 6, "timestamp": 0})
    box.deliver({"op": "tags", "tags": {"a": "b"}})
    assert discard_after(tmp_path, 5) == 2
    assert [r["op"] for r in map(json.loads, spool_path(tmp_path).read_text().splitlines())] == ["metrics", "metrics",
                                                                                                 "tags"]
    assert len((tmp_path / (SPOOL_FILE + ".discarded")).read_text().splitlines()) == 2
    assert SPOOL_FILE + ".discarded" in TRACKER_FILES


def test_a_fresh_run_moves_the_previous_runs_unsent_records_aside_with_it():
    """--overwrite sets the old run's files aside: its unsent records go with them, never into the new run."""
    assert {SPOOL_FILE, REJECTED_FILE} <= set(TRACKER_FILES)


def test_the_sweep_table_says_which_trial_lacks_tracking_data(tmp_path):
    trial = tmp_path / "trials" / "t1"
    trial.mkdir(parents=True)
    assert _tracking_state(trial) == ""
    spool_path(trial).write_text('{"op": "tags", "tags": {}}\n')
    row = TrialRow(trial_id="t1", name="t1", params={}, overrides={}, best_fid=None, final_fid=None, step=4,
                   outcome="completed", tracking=_tracking_state(trial))
    assert "MLflow tracking incomplete (1 unsent" in results_table([row], [])


def test_an_unreachable_store_keeps_every_record_marks_the_final_line_and_a_resume_sends_them(tmp_path, capsys,
                                                                                            monkeypatch):
    """Before: the first failure dropped every later param, metric and image of the run."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    from mlflow import MlflowClient

    from launcher.train import _train

    base = [*TINY, "train.batch_size=8", "train.log_every=1", "train.sample_every=2", "checkpoint.every=0",
            f"run.out_dir={tmp_path}/run", "tracking.system_metrics=false", "tracking.experiment=spool"]
    assert _train(load_config(DEMO, [*base, "train.steps=3",
                                     f"tracking.mlflow_uri=http://127.0.0.1:{free_port()}"])) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "MLflow tracking incomplete" in last and "mlflow_spool.jsonl" in last, last
    assert unsent(tmp_path / "run") > 0
    db = tmp_path / "store.db"
    assert _train(load_config(DEMO, [*base, "train.steps=5", f"tracking.mlflow_uri=sqlite:///{db}",
                                     "checkpoint.resume=auto"])) == 0
    assert "incomplete" not in capsys.readouterr().out
    assert unsent(tmp_path / "run") == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    [run] = client.search_runs([client.get_experiment_by_name("spool").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/d_loss")) == [1, 2, 3, 4, 5]
    assert run.data.params["train.batch_size"] == "8" and run.data.tags.get("rgan.tracking") == "complete"
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert image_steps(set(images), "samples").count(2) == 1, images  # the replayed grid, once


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from PIL import Image
    from rgan_dist.config import load_config
    from rgan_dist.tracking import MlflowTracker

    uri, out, i = sys.argv[1:]
    cfg = load_config(None, [f"tracking.mlflow_uri={uri}", "tracking.experiment=concurrent", f"run.out_dir={out}",
                             f"run.name=writer{i}", "tracking.system_metrics=false"])
    t = MlflowTracker(cfg, tags={"writer": i}, start_timeout_s=300)
    t.log_params(cfg.flat())
    png = Path(out) / "grid.png"
    Image.new("RGB", (8, 8), (int(i) * 40, 0, 0)).save(png)
    for step in range(1, 61):
        t.log_metrics({"d_loss": float(step)}, step)
        if step % 20 == 0:
            t.log_image(png, "samples", step)
        time.sleep(0.1)
    t.set_tags({"writer.done": "yes"})
    t.close()
""")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_concurrent_writers_into_one_fresh_sqlite_store_every_record_lands(tmp_path):
    """Four trials open one new SQLite store at once and write while another process holds its write lock
    longer than SQLite's busy timeout (MLflow's 20 s): every param, metric, image and tag still lands."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    (tmp_path / "writer.py").write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), uri, str(tmp_path / f"w{i}"), str(i)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(4)]
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # the moment the writers are logging metrics
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    if conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] > 0:
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.2)
        else:
            for p in procs:
                p.kill()
            outs = [p.communicate()[0] for p in procs]
            pytest.fail("the writers never logged a metric:\n" + "\n".join(o[-1500:] for o in outs))
        blocker = sqlite3.connect(db, timeout=60, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        time.sleep(24)  # > MLflow's busy_timeout of 20 s: a writer's call fails at least once
        blocker.execute("COMMIT")
        blocker.close()
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert sorted(r.data.tags["writer"] for r in runs) == ["0", "1", "2", "3"], "\n".join(outs)
    n_params = len(load_config(None).flat())
    for run in runs:
        rid = run.info.run_id
        assert len(run.data.params) == n_params
        assert sorted(m.step for m in client.get_metric_history(rid, "train/d_loss")) == list(range(1, 61))
        assert run.data.tags.get("writer.done") == "yes" and run.info.status == "FINISHED"
        images = {a.path for a in client.list_artifacts(rid, "images")}
        assert image_steps(images, "samples") == [20, 40, 60], images
    assert all(unsent(tmp_path / f"w{i}") == 0 for i in range(4))
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
