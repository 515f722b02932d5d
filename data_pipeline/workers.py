"""What runs in, or decides how to start, the reader's DataLoader worker processes.

Kept apart from the reader's stream logic because these are process concerns: how a worker starts (fork, or
forkserver beside Ray's threads), its thread count, and what a stop signal sent to the whole job does to it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

_stop_signals_seen = 0  # in this worker process (a forked worker starts from the parent's 0)


def worker_init(_: int) -> None:
    """`DataLoader(worker_init_fn=...)`: one torch thread, and the stop-signal handling below."""
    torch.set_num_threads(1)  # decoding is PIL's; torch threads in workers only oversubscribe cores
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_signal)


def _stop_signal(signum: int, frame: Any) -> None:
    """A data worker outlives the first stop signal (SIGTERM or SIGINT) and exits cleanly on the second.

    Why: a stop is the trainer's to carry out. Slurm's pre-emption and `kill -- -PGID` signal every process of
    the job, the workers included. A worker killed by SIGTERM made PyTorch's SIGCHLD handler raise
    ("DataLoader worker ... is killed by signal") in the middle of the trainer's final checkpoint, or, under
    several ranks, which stop together at the next logged step, in a rank still reading the batches up to that
    step: a traceback and the steps since the last checkpoint lost (tests/test_run_faults.py). Ctrl-C reaches
    the workers too and is treated alike. So the first signal is ignored (the trainer shuts its workers down
    when it is done, and a worker whose trainer is gone exits by PyTorch's watchdog). The second ends the
    worker at once with status 0 (not an error for that handler): a second Ctrl-C, or a `terminate()` of a
    worker that would not stop (PyTorch sends one at shutdown, and multiprocessing another at interpreter
    exit, so even a stuck worker ends)."""
    global _stop_signals_seen
    _stop_signals_seen += 1
    if _stop_signals_seen > 1:
        os._exit(0)


def worker_start_method() -> str | None:
    """How DataLoader workers start: forked (the default, None), except in a process that runs Ray.

    A Ray worker (a sweep's trial) runs gRPC and abseil threads; a child forked from it inherits their locks in
    whatever state they were, and gRPC's fork handlers then abort it with abseil's "Mutex corrupt" check
    (SIGABRT, "Fatal Python error: Aborted"; grpc/grpc#32992, grpc/grpc#32758: a torch DataLoader forked
    after gRPC started). "forkserver" forks the workers from a fresh single-threaded server process instead.
    Ray is looked up, never imported: the data pipeline does not depend on it."""
    ray = sys.modules.get("ray")
    is_initialized = getattr(ray, "is_initialized", None)
    return "forkserver" if callable(is_initialized) and is_initialized() else None
