"""A launched rank notices that its launcher is gone, and stops like a pre-empted job.

`torchrun` (and the `deepspeed` launcher) supervise their workers: a failing rank ends the job, a restart
starts every rank again. A SIGKILLed agent cannot do that any more, and its workers used to go on training,
unsupervised, to the last step. `watch_parent` polls the parent pid from a daemon thread; once it changes
(the worker was re-parented to init or a subreaper) the worker sends itself one SIGTERM, which the training
loop already handles as a pre-emption notice: every rank agrees on a step, writes the final checkpoint and
exits. One signal only, on purpose: a second SIGTERM means "stop now, without the agreed step"
(`engine.hooks.StopRequest`). If the run has not ended `grace_s` later (e.g. stuck in a collective whose
peer is gone as well), the process exits anyway, so the bound holds.

A poll rather than Linux's `prctl(PR_SET_PDEATHSIG)`: that fires when the parent *thread* that forked the
worker ends, not only the process, is Linux-only, and cannot say in the log why the run stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping

# Variables a launcher that supervises its workers sets: torchrun (TORCHELASTIC_RUN_ID) and deepspeed's
# launcher (which sets RANK/LOCAL_RANK for each child it spawns).
LAUNCHED_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")
THREAD_NAME = "rgan-parent-watch"


def launched(env: Mapping[str, str]) -> bool:
    """True when a launcher started this process (its parent is the supervisor to watch)."""
    return any(k in env for k in LAUNCHED_ENV)


def watch_parent(*, grace_s: float, interval_s: float = 1.0, what: str = "the launcher") -> threading.Thread | None:
    """Start the watch (a daemon thread); None when there is no parent to watch (already re-parented)."""
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        print(f"rgan: {what} (pid {parent}) is gone: stopping at the next logged step with a final checkpoint; "
              f"exiting in at most {grace_s:.0f} s", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        print(f"rgan: error: still running {grace_s:.0f} s after {what} (pid {parent}) went away: exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name=THREAD_NAME, daemon=True)
    thread.start()
    return thread
