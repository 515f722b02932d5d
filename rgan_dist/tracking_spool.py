"""Tracking never drops a run's data silently: bounded retries, a spool in the run folder, replay, and a mark.

A tracking store can be briefly busy (several sweep trials writing one SQLite file), slow, or gone. Every
record the tracker sends (params, metrics, tags, artifacts, images, the end status) goes through an `Outbox`:

- it is retried with bounded exponential backoff (`with_retries`);
- what still cannot be sent is appended to `<run.out_dir>/mlflow_spool.jsonl` and the store is left alone
  for a cool-down (growing to `MAX_COOLDOWN_S`), so a dead server costs one bounded wait, not one per record;
- the spool is replayed, in order and before anything newer, on the next call after the cool-down, at the
  end of the run, and by the next job that opens the same run folder (`--resume auto`);
- whatever is left at the end stays in the spool (or, if the store refused it outright, in
  `mlflow_rejected.jsonl`), the run is tagged `rgan.tracking=incomplete` if the store can still be reached,
  and `incomplete_note` gives the line the CLI's final output and the sweep's results table show.

`prepare_sqlite_store` makes the default local store safe for concurrent writers: WAL journal mode (readers
never block the writer; persistent in the file), and schema creation under a file lock, so four trials that
open a fresh store at once do not race through MLflow's migrations. (MLflow 3.17 itself sets a 20 s SQLite
busy timeout on every session; a lock held longer is what the retries here absorb.)
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

SPOOL_FILE = "mlflow_spool.jsonl"
REJECTED_FILE = "mlflow_rejected.jsonl"
INCOMPLETE_TAG = "rgan.tracking"
ATTEMPTS = 3            # per record: the first try and two retries
FIRST_DELAY_S = 0.5     # then 1 s: a record costs at most ~1.5 s of sleeps besides the calls themselves
FIRST_COOLDOWN_S = 5.0  # after a record could not be sent: spool without trying for this long ...
MAX_COOLDOWN_S = 60.0   # ... doubling up to this
SQLITE_TIMEOUT_S = 60.0

T = TypeVar("T")


class Unsendable(Exception):
    """A record no retry can send (its file is gone, the store refuses the value): set aside, not retried."""


def with_retries(fn: Callable[[], T], *, attempts: int = ATTEMPTS, first_delay_s: float = FIRST_DELAY_S,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, retried on any exception but `Unsendable` with delays first_delay_s, 2x, 4x...; the last error
    propagates. Bounded: `attempts` calls in all."""
    delay = first_delay_s
    for attempt in range(attempts):
        try:
            return fn()
        except Unsendable:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def spool_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / SPOOL_FILE


def _count(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def unsent(out_dir: str | Path) -> int:
    """Records of this run folder's MLflow run that are not in the store (spooled or rejected)."""
    return _count(spool_path(out_dir)) + _count(Path(out_dir) / REJECTED_FILE)


def incomplete_note(out_dir: str | Path) -> str:
    """'' when the run's tracking is complete; else what is missing and where it is kept, in one phrase."""
    spooled, rejected = _count(spool_path(out_dir)), _count(Path(out_dir) / REJECTED_FILE)
    parts = []
    if spooled:
        parts.append(f"{spooled} record(s) not yet sent, kept in {spool_path(out_dir)} (sent when the run resumes "
                     "with --resume auto)")
    if rejected:
        parts.append(f"{rejected} refused by the store, kept in {Path(out_dir) / REJECTED_FILE}")
    return f"MLflow tracking incomplete: {'; '.join(parts)}" if parts else ""


def discard_after(out_dir: str | Path, step: int) -> int:
    """On resume from the checkpoint of `step`: spooled metrics and images of later steps belong to the attempt
    that is being redone; they move to `mlflow_spool.jsonl.discarded` (kept, not sent), as metrics.jsonl's
    records do, so MLflow gets each step once. Returns how many moved."""
    path = spool_path(out_dir)
    records = list(_read(path))
    late = [r for r in records if r.get("op") in ("metrics", "image") and _step(r) > step]
    if late:
        with open(path.with_name(path.name + ".discarded"), "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in late))
        _rewrite(path, [r for r in records if r not in late])
    return len(late)


def _step(record: dict[str, Any]) -> int:
    return int(record["step"]) if record["op"] == "image" else max((m[3] for m in record["metrics"]), default=-1)


class Outbox:
    """Delivers tracking records in order (one thread: the tracker's worker), spooling what cannot be sent.

    `send(record)` makes the store call for one record; `ready()` makes sure the run exists (called before
    every delivery, so a run whose creation failed is created on a later try). `session` marks this job's
    records: an `end` record a previous job left in the spool is not replayed (this job ends the run itself)."""

    def __init__(self, out_dir: str | Path, send: Callable[[dict[str, Any]], None], ready: Callable[[], None], *,
                 session: str, on_failure: Callable[[BaseException], None],
                 on_recovery: Callable[[int], None] = lambda n: None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = spool_path(out_dir)
        self.rejected = Path(out_dir) / REJECTED_FILE
        self._send, self._ready, self.session = send, ready, session
        self._on_failure, self._on_recovery = on_failure, on_recovery
        self._clock, self._sleep = clock, sleep
        self._next_try = 0.0
        self._cooldown = FIRST_COOLDOWN_S
        self.failing = False

    # ---- delivery ---------------------------------------------------------------------------------------

    def deliver(self, record: dict[str, Any]) -> bool:
        """Send `record` after whatever the spool holds; True if it reached the store."""
        record = {**record, "session": self.session}
        if self._clock() < self._next_try:
            self._append(self.path, record)
            return False
        try:
            self._try(record)
        except Exception as e:
            self._append(self.path, record)
            self._failed(e)
            return False
        return True

    def connect(self) -> bool:
        """Make sure the run exists (retried); a failure starts the cool-down. True if the store answered."""
        try:
            self._try(None)
        except Exception as e:
            self._failed(e)
            return False
        return True

    def finish(self) -> int:
        """The end of the run: one more attempt at the spool, cool-down or not (a single try when the store
        failed last time: the run is ending, a dead store must not hold it up). If records are still missing,
        the run is tagged `rgan.tracking=incomplete` (when the store answers) and one line says what is
        kept where. Returns the number of records left."""
        if self.path.exists():
            with contextlib.suppress(Exception):
                self._try(None, attempts=1 if self.failing else ATTEMPTS)
        left = _count(self.path) + _count(self.rejected)
        if left:
            if not self.failing:
                with contextlib.suppress(Exception):
                    self._send({"op": "tags", "tags": {INCOMPLETE_TAG: "incomplete"}})
            print(f"rgan: {incomplete_note(self.path.parent)}", file=sys.stderr, flush=True)
        return left

    def _try(self, record: dict[str, Any] | None, attempts: int = ATTEMPTS) -> None:
        with_retries(self._ready, attempts=attempts, sleep=self._sleep)
        replayed = self._replay()
        if record is not None:
            self._send_one(record)
        if self.failing or replayed:
            self.failing, self._cooldown = False, FIRST_COOLDOWN_S
            if replayed and not self.rejected.exists():
                with contextlib.suppress(Exception):  # a run marked incomplete before is whole again
                    self._send({"op": "tags", "tags": {INCOMPLETE_TAG: "complete"}})
            self._on_recovery(replayed)

    def _send_one(self, record: dict[str, Any]) -> None:
        try:
            with_retries(lambda: self._send(record), sleep=self._sleep)
        except Unsendable as e:
            self._append(self.rejected, {**record, "error": str(e)})

    def _replay(self) -> int:
        """Send the spooled records in order; on a failure keep the rest (that one first) and raise."""
        records = list(_read(self.path))
        for i, record in enumerate(records):
            if record.get("op") == "end" and record.get("session") != self.session:
                continue  # a previous job's end status: this job is the run now
            try:
                self._send_one(record)
            except Exception:
                _rewrite(self.path, records[i:])
                raise
        if records:
            self.path.unlink(missing_ok=True)
        return len(records)

    def _failed(self, error: BaseException) -> None:
        first = not self.failing
        self.failing = True
        self._next_try = self._clock() + self._cooldown
        self._cooldown = min(MAX_COOLDOWN_S, self._cooldown * 2)
        if first:
            self._on_failure(error)

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _read(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        with contextlib.suppress(ValueError):  # a line torn by a crash mid-append: the rest still counts
            if line.strip():
                yield json.loads(line)


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the store


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for any other store, or an in-memory one)."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def prepare_sqlite_store(uri: str) -> None:
    """Make a SQLite store ready for several writing processes: create MLflow's schema under an exclusive file
    lock (one process migrates, the others wait, then find the tables) and switch the file to WAL. Other
    stores: nothing to do."""
    db = sqlite_path(uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock; MLflow's own retries still apply
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=SQLITE_TIMEOUT_S)) as conn:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, str(db.parent / "mlruns"))  # creates or migrates the schema, once
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
