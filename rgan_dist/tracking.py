"""Where metrics go. Non-main ranks get the null `Tracker`, so the loop never asks `if rank == 0`.

`JsonlTracker` appends one JSON object per logged step to `<run.out_dir>/metrics.jsonl`: the record
that survives any tracking-server failure. `MlflowTracker` writes that same file and, in addition, one
MLflow run per training job (created by rank 0 only; `make_tracker` is the factory the loop uses).

Why MLflow calls run on a background thread: a tracking server that is slow, hung or gone must never
stall a GPU job. The training thread only appends to the JSONL file and enqueues records; one worker thread
hands them, in order, to an `Outbox` (`rgan_dist.tracking_spool`): bounded retries, then a spool file in the
run folder that is replayed once the store answers again, or by the job that resumes the run; nothing is
dropped silently. The first failure prints ONE warning line. MLflow's own HTTP retries are bounded too
(`bound_http_retries`), so even a failing call costs seconds.

What MLflow's UI shows is shaped here, in one place: metric names grouped as `train/...` and `eval/...`
(`mlflow_name`; metrics.jsonl keeps the plain names the code uses), sample grids on the image cards' step slider
and as plain files under `samples/` (the Artifacts tab), system metrics (CPU, RAM, disk, network, GPU) sampled by
MLflow's own monitor on rank 0, a run description plus dataset tags (`run_tags`), the training data as an MLflow
dataset input (the Dataset column), and experiments of the model-training kind (`mlflow_view` says what the UI
needs of each).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rgan_dist.tracking_spool import Outbox, Unsendable, prepare_sqlite_store

if TYPE_CHECKING:  # the loop imports this module; keep torch/mlflow out of its import cost
    from rgan_dist.config import Config

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"  # MLflow's own default artifact root for a SQL store, made absolute here
RUN_FILE = "mlflow_run.json"  # in run.out_dir: which run a resumed job continues
CHECKPOINT_POLICIES = ("none", "best", "final", "both")

# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) make one call to a dead server block for
# minutes. Ours: a refused connection fails at once; a hung server costs at most (1 + 2) x 20 s.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_WORKER_THREAD = "rgan-mlflow"
CLOSE_TIMEOUT_S = 600.0  # the longest a job waits at exit for queued uploads (checkpoints) to finish
_MONITOR_THREAD = "SystemMetricsMonitor"  # the thread name MLflow's system metrics monitor runs under

# The names the evaluators (rgan_dist.metrics.evaluator) return, and the sweep parent's best FID: grouped under
# `eval/` in MLflow. Every other metric the loop logs is a training measurement: `train/`.
EVAL_METRICS = frozenset({"fid", "kid", "kid_std", "modes", "modes_kl", "modes_seconds", "eval_seconds",
                          "best_fid"})
# Logged beside every evaluation: wall-clock seconds since the MLflow run started. The UI's "Time (relative)"
# axis counts from each metric's *first* value (the first FID, not the run's start), so comparing FID against
# time across loss variants needs this as the x-axis ("Metric" -> eval/elapsed_s).
ELAPSED = "eval/elapsed_s"



def mlflow_name(key: str) -> str:
    """The MLflow name of metric `key`: `eval/<key>` for evaluation results, `train/<key>` for the rest; a
    name that already has a group (`system/...`, `sweep/...`) is kept. The only place the grouping is decided:
    readers (report, sweep, benchmarks, tests) look names up through it."""
    if "/" in key:
        return key
    return f"eval/{key}" if key in EVAL_METRICS else f"train/{key}"


def experiment_id(client: Any, name: str, artifact_root: str | Path | None) -> str:
    """The id of MLflow experiment `name`, created (artifacts under `artifact_root/name`, a folder or a URL
    such as s3://bucket/mlruns) if missing; safe when another job creates it between our look-up and our
    create."""
    from rgan_dist.mlflow_view import EXPERIMENT_KIND

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():  # an experiment made before the kind was set, or by hand
            if key not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    root = str(artifact_root or "")
    location = (f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)) if root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def metric_history(client: Any, run_id: str, key: str) -> list[Any]:
    """MLflow's history of the metric the code calls `key` (under `mlflow_name(key)`), or of the plain name
    for a run logged before metric names were grouped."""
    return client.get_metric_history(run_id, mlflow_name(key)) or client.get_metric_history(run_id, key)


class Tracker:
    """Does nothing: the tracker of every rank but 0, and of runs with tracking disabled."""

    # Whether `log_image` feeds an image slider that opens on step 0 (MLflow 3.17's image cards do, and the UI
    # alone decides it): the loop then logs the untrained generator's grid at step 0, so the slider opens on a grid.
    slider_starts_at_zero = False

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, context: dict[str, str] | None = None) -> None:
        """`context`: strings that say how the values were obtained (e.g. the FID protocol); they go in
        the same JSONL record (key `context`) and become MLflow tags."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        """An image file shown under `key` at `step` (MLflow's image slider) and kept as the artifact `key/<name>`;
        the file stays where it is."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_checkpoint(self, path: str | Path, kind: str) -> None:
        """`kind` is "best" or "final"; trackers that store files decide by `tracking.log_checkpoints`."""

    def close(self, status: str = "FINISHED") -> None:
        pass


class JsonlTracker(Tracker):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int, context: dict[str, str] | None = None) -> None:
        self._write(metrics, step, context, time.time())

    def _write(self, metrics: dict[str, float], step: int, context: dict[str, str] | None, when: float) -> None:
        record: dict[str, Any] = {"step": step, "time": when, **{k: float(v) for k, v in metrics.items()}}
        if context:
            record["context"] = {k: str(v) for k, v in context.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------- MLflow


def recorded_active_run(client: Any, record_file: Path, uri: str, key: str) -> str | None:
    """The run id that `record_file` (JSON written when the run started) names under `key`, if the record is
    for this tracking store and the run still exists and is active: how a resumed run, or a resumed sweep's
    parent run, continues the MLflow run it logged to before instead of starting a second one."""
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return None
    if record.get("tracking_uri") != uri or not record.get(key):
        return None
    try:
        run = client.get_run(record[key])
    except Exception:  # deleted, another store, the server unreachable: start a new run
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def bound_http_retries() -> dict[str, str]:
    """Set MLflow's HTTP retry/timeout variables to `HTTP_DEFAULTS` where the user set none; returns
    the values in force. MLflow reads them on every request, so this works after import too."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in HTTP_DEFAULTS}


def resolve_store(uri: str, cwd: str | Path | None = None, artifact_root: str = "") -> tuple[str, str | None]:
    """(tracking URI, artifact root or None). Empty `uri`: a SQLite file and an artifact folder in
    the working directory, both absolute, so `mlflow ui` started elsewhere finds the same store. A SQLite
    URI keeps its artifacts in `mlruns/` beside the database (MLflow would use the working directory of
    whichever process creates the experiment); a server decides for itself (None). `artifact_root`
    (tracking.artifact_root) overrides either: a URL (s3://bucket/mlruns) as given, a folder made absolute."""
    base = Path(cwd or os.getcwd()).resolve()
    if not uri:
        uri, root = f"sqlite:///{base / DEFAULT_DB}", str(base / DEFAULT_ARTIFACTS)
    elif uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        db = Path(uri[len("sqlite:///"):])
        db = db if db.is_absolute() else base / db
        uri, root = f"sqlite:///{db}", str(db.parent / DEFAULT_ARTIFACTS)
    else:
        root = None
    if artifact_root:
        root = artifact_root if "://" in artifact_root else str(base / Path(artifact_root).expanduser())
    return uri, root


def ui_command(uri: str, artifacts: str | None) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    cmd = f"mlflow ui --backend-store-uri {uri}"
    return f"{cmd} --default-artifact-root {artifacts}" if artifacts else cmd


class _QuietWorkerLogs(logging.Filter):
    """Drop what MLflow/urllib3/alembic log from our worker thread: a failure is reported by our one
    warning line, not by a retry message per attempt."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName not in (_WORKER_THREAD, _MONITOR_THREAD)


_QUIET_LOGGERS = ("urllib3.connectionpool", "mlflow.store.db.utils", "alembic.runtime.migration",
                  "mlflow.utils.rest_utils", "mlflow.tracking._tracking_service.client",
                  "mlflow.store.artifact.artifact_repo", "mlflow.tracking.client",
                  "mlflow.system_metrics.system_metrics_monitor")


class MlflowTracker(JsonlTracker):
    """One MLflow run for the whole job, fed from a worker thread; every metric also goes to the JSONL
    file first (module docstring says why)."""

    slider_starts_at_zero = True

    def __init__(self, cfg: Config, *, tags: dict[str, str] | None = None, jsonl_path: str | Path | None = None,
                 start_timeout_s: float = 30.0) -> None:
        super().__init__(jsonl_path or cfg.out_dir / "metrics.jsonl")
        self.cfg = cfg
        self.uri, self.artifact_root = resolve_store(cfg.tracking.mlflow_uri, artifact_root=cfg.tracking.artifact_root)
        self.experiment = cfg.tracking.experiment
        self.log_checkpoints = cfg.tracking.log_checkpoints
        self.run_id: str | None = None
        self.logged_through: dict[str, int] = {}  # a continued run: each metric's last step in MLflow (`_start`)
        self._run_start = time.time()  # replaced by the MLflow run's start time once the run exists
        self._monitor: Any = None
        self.failed = False
        self._warned = False
        self._queue: queue.Queue[tuple[Any, bool] | None] = queue.Queue()
        self._tags = dict(tags or {})
        self._outbox = Outbox(self.cfg.out_dir, self._send, self._ready, session=uuid.uuid4().hex,
                              on_failure=self._fail, on_recovery=self._recovered)
        self._started = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        bound_http_retries()
        for name in _QUIET_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, _QuietWorkerLogs) for f in logger.filters):
                logger.addFilter(_QuietWorkerLogs())
        where = f"{self.uri}" + (f", artifacts in {self.artifact_root}" if self.artifact_root else "")
        print(f"rgan: MLflow tracking store {where}", flush=True)
        print(f"rgan: view it with: {ui_command(self.uri, self.artifact_root)}", flush=True)
        self._thread = threading.Thread(target=self._work, name=_WORKER_THREAD, daemon=True)
        self._thread.start()
        self._queue.put((self._start_now, True))
        # Wait for the run to exist, so its id is printed in order and a local store error shows at
        # start; a hung server costs at most this long, after which training goes on regardless (what it
        # logs is kept and sent once the run exists).
        if not self._started.wait(start_timeout_s) and not self.failed:
            self._fail(TimeoutError(f"no answer within {start_timeout_s:.0f}s"))

    # ---- the public API (training thread) ------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        self._enqueue({"op": "params", "params": {k: _param_value(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int, context: dict[str, str] | None = None) -> None:
        # One clock reading, taken now on the training thread (not when the worker gets to it): the JSONL
        # record's time and every MLflow timestamp are the wall-clock moment the values were logged, which for
        # an evaluation is the moment it finished.
        now = time.time()
        self._write(metrics, step, context, now)
        if context:
            self.set_tags(context)
        ms = int(now * 1000)
        values = {mlflow_name(k): float(v) for k, v in metrics.items()}
        if any(k in EVAL_METRICS for k in metrics):
            values[ELAPSED] = max(0.0, now - self._run_start)
        # A step re-run after a restart that MLflow already holds is not sent twice (`_start`).
        batch = [[k, v, ms, int(step)] for k, v in values.items() if step > self.logged_through.get(k, -1)]
        if not batch:
            return
        self._enqueue({"op": "metrics", "metrics": batch})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._enqueue({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        if step <= max(self.logged_through.values(), default=-1):  # sent by the attempt before a restart
            return
        self._enqueue({"op": "image", "path": str(path), "key": key, "step": int(step),
                       "timestamp": int(time.time() * 1000)})

    def submit(self, fn: Callable[[Any, str], None]) -> None:
        """Run `fn(client, run_id)` on the worker thread, in order with everything logged before it: for MLflow
        calls this class has no method for (the final generator as a logged model, rgan_dist.mlflow_model)."""
        if not self._closed:  # a call, not a record: it cannot be kept in the spool; a failure is warned
            self._queue.put((lambda: fn(self._client, self.run_id), True))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._enqueue({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_checkpoint(self, path: str | Path, kind: str) -> None:
        if self.log_checkpoints in (kind, "both") and Path(path).is_file():
            self.log_artifact(path, "checkpoints")

    def close(self, status: str = "FINISHED") -> None:
        """Flush what is queued (uploads included), end the run with `status`, stop the worker."""
        if self._closed:
            return
        self._queue.put((self._stop_monitor, True))  # its last samples go in before the run ends
        self._enqueue({"op": "end", "status": status})
        self._closed = True
        self._queue.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            self._fail(TimeoutError(f"uploads still pending after {CLOSE_TIMEOUT_S:.0f}s at exit"))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything enqueued so far was handled (sent, or kept in the spool after a failure)."""
        if not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put((done.set, True))
        return done.wait(timeout_s)

    # ---- the worker thread --------------------------------------------------------------------------

    def _enqueue(self, record: dict[str, Any]) -> None:
        if not self._closed:
            self._queue.put((record, False))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._outbox.finish()  # a last try at what is kept; else the run is marked, in one line
                return
            payload, is_call = item
            try:
                if is_call:  # our own step in the sequence (start, flush marker, monitor stop)
                    payload()
                else:
                    self._outbox.deliver(payload)  # retried, else spooled: never raises for a store failure
            except Exception as e:
                self._fail(e)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self.failed = True
            self._started.set()
            if self._warned:
                return
            self._warned = True
        print(f"rgan: warning: MLflow tracking at {self.uri} failed ({_brief(error)}); training goes on, metrics "
              f"stay in {self.path}; MLflow records are kept in {self._outbox.path} and sent when the store "
              "answers again", file=sys.stderr, flush=True)

    def _recovered(self, replayed: int) -> None:
        self.failed = False
        if replayed:
            print(f"rgan: MLflow tracking at {self.uri}: sent {replayed} kept record(s)", flush=True)

    def _start_now(self) -> None:
        """The worker's first step: the run, with retries (else retried on later records, kept meanwhile)."""
        try:
            self._outbox.connect()
        finally:
            self._started.set()

    def _ready(self) -> None:
        if self.run_id is None:
            self._start(self._tags)

    def _send(self, record: dict[str, Any]) -> None:
        """One record to the store (`Outbox` calls it, with retries); `Unsendable` for what retries cannot fix."""
        op = record["op"]
        if op == "params":
            self._log_params(record["params"])
        elif op == "metrics":
            from mlflow.entities import Metric

            batch = [Metric(k, v, ms, step) for k, v, ms, step in record["metrics"]]
            self._client.log_batch(self.run_id, metrics=batch, synchronous=True)
        elif op == "tags":
            self._set_tags(record["tags"])
        elif op in ("artifact", "image") and not Path(record["path"]).is_file():
            raise Unsendable(f"{record['path']} no longer exists")
        elif op == "artifact":
            self._client.log_artifact(self.run_id, record["path"], record["artifact_path"])
        elif op == "image":
            from rgan_dist.mlflow_view import image_card_files

            local = Path(record["path"])
            with tempfile.TemporaryDirectory() as tmp:
                for file in image_card_files(local, record["key"], record["step"], record["timestamp"], Path(tmp)):
                    self._client.log_artifact(self.run_id, str(file), "images")
            self._client.set_tag(self.run_id, "mlflow.loggedImages", "True", synchronous=True)
            self._client.log_artifact(self.run_id, str(local), record["key"])  # the Artifacts tab previews it
        elif op == "end":
            self._client.set_terminated(self.run_id, record["status"])
        else:
            raise Unsendable(f"unknown tracking record {op!r}")

    def _start(self, tags: dict[str, str]) -> None:
        from mlflow import MlflowClient

        prepare_sqlite_store(self.uri)  # WAL, schema made once: several trials may share the file
        self._client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = exp_id = experiment_id(self._client, self.experiment, self.artifact_root)
        previous = self._previous_run()
        if previous is not None:
            self.run_id = previous
            self._client.update_run(previous, status="RUNNING")
            tags = {**tags, "rgan.resumed": "true"}
            # The attempt that died may have logged steps past the checkpoint this one resumes from; they are
            # logged again (metrics.jsonl moved its copies aside): MLflow keeps one point per step.
            latest = self._client.get_run(previous).data.to_proto().metrics  # each metric's highest step
            self.logged_through = {m.key: m.step for m in latest if not m.key.startswith("system/")}
        else:
            run = self._client.create_run(exp_id, run_name=self.cfg.run.name, tags=tags)
            self.run_id = run.info.run_id
        self._run_start = self._client.get_run(self.run_id).info.start_time / 1000.0
        self._set_tags(tags)
        if previous is None and "rgan.dataset" in tags:
            from rgan_dist.mlflow_view import dataset_input

            self._client.log_inputs(self.run_id, datasets=[dataset_input(tags)])
        if self.cfg.tracking.system_metrics:
            self._start_monitor(resume=previous is not None, cuda=tags.get("rgan.device", "").startswith("cuda"))
        record = {"tracking_uri": self.uri, "run_id": self.run_id, "experiment_id": exp_id}
        self.cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.out_dir / RUN_FILE).write_text(json.dumps(record) + "\n")
        from rgan_dist.mlflow_view import ui_link

        # the run page in MLflow's model-training view (mlflow_view.EXPERIMENT_KIND says why); a local store's
        # link assumes `mlflow ui` on its default port, 5000
        link = ui_link(self.uri if self.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000",
                       exp_id, self.run_id)
        where = f": {link}" if self.uri.startswith(("http://", "https://")) else \
            f" in experiment {self.experiment!r} (`mlflow ui`: {link})"
        print(f"rgan: MLflow run {self.run_id}{' (continued)' if previous else ''}{where}", flush=True)
        self._started.set()

    def _start_monitor(self, *, resume: bool, cuda: bool) -> None:
        """MLflow's system metrics monitor on its own thread, for this run (`system/...`: CPU and RAM use, disk,
        network; GPU utilisation, memory and power when pynvml is installed). Only rank 0 has an MlflowTracker,
        so only rank 0 samples: its node's CPU and every GPU that node has. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
        if set, overrides `tracking.system_metrics_interval_s` (MLflow's own rule)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.tracking.system_metrics_interval_s,
                                       resume_logging=resume, tracking_uri=self.uri)
        kinds = [type(m).__name__.removesuffix("Monitor") for m in monitor.monitors]
        gpu = any(k in ("GPU", "ROCM") for k in kinds)
        hint = " (no GPU metrics: pip install nvidia-ml-py)" if cuda and not gpu else ""
        monitor.start()
        self._monitor = monitor
        print(f"rgan: MLflow system metrics every {monitor.sampling_interval:g}s: {', '.join(kinds)}{hint}",
              flush=True)

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()

    def _previous_run(self) -> str | None:
        """On resume, the run this output folder logged to before, if it is in the same store."""
        if not self.cfg.checkpoint.resume:
            return None
        return recorded_active_run(self._client, self.cfg.out_dir / RUN_FILE, self.uri, "run_id")

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        # A resumed run already holds params; MLflow refuses to change one (e.g. train.steps raised on
        # resume), so changed values are recorded as tags instead of failing the tracker.
        existing = self._client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = {f"resumed.{k}": v for k, v in params.items() if k in existing and existing[k] != v}
        for i in range(0, len(new), 100):  # MLflow's per-request limit
            self._client.log_batch(self.run_id, params=new[i : i + 100], synchronous=True)
        if changed:
            self._set_tags(changed)

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, tags=items[i : i + 100], synchronous=True)


def _brief(error: BaseException, limit: int = 240) -> str:
    """One line: MLflow's messages put the URL first and the cause (refused, timed out) last."""
    text = " ".join(str(error).split()) or "no message"
    if len(text) > limit:
        text = f"{text[: limit // 3]} ... {text[-(2 * limit) // 3 :]}"
    return f"{type(error).__name__}: {text}"


def _param_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def make_tracker(cfg: Config, is_main: bool, *, tags: dict[str, str] | None = None) -> Tracker:
    """The tracker of one rank: the null tracker off rank 0; on rank 0 the JSONL file, plus an MLflow run
    (params = the resolved config, flattened; the config YAML as an artifact) when tracking is enabled."""
    if not is_main:
        return Tracker()
    if not cfg.tracking.enabled:
        return JsonlTracker(cfg.out_dir / "metrics.jsonl")
    from rgan_dist.config import dump_config

    tracker = MlflowTracker(cfg, tags=tags)
    tracker.log_params(cfg.flat())
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    config_path = cfg.out_dir / "config.yaml"
    config_path.write_text(dump_config(cfg))
    tracker.log_artifact(config_path)
    return tracker
