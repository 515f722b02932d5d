"""Which rank did not answer: the one line a healthy rank gives when a collective fails.

A rank that stalls (SIGSTOP, a hung filesystem, a GPU wedged) makes every other rank's next collective time
out after `dist.timeout_s`, and Gloo's message ("Timed out waiting 10000ms for recv operation to complete")
names nobody; torchrun's summary then blames the healthy rank that failed first, with a traceback. So after a
collective failure each healthy rank checks in at the rendezvous store (which lives outside the ranks: the
torchrun agent's, or rank 0's) and waits `PROBE_S` for the others; the ranks that never check in are the
ones that did not answer. Without a reachable store, a world of two still knows: it is the other rank.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Mapping
from datetime import timedelta

PROBE_S = 8.0  # > the spread between the healthy ranks' own timeouts of one collective
_COLLECTIVE = re.compile(r"gloo|nccl|timed out|connection (closed|reset)|broken pipe|process ?group|collective",
                         re.IGNORECASE)


def is_collective_failure(error: BaseException, world_size: int) -> bool:
    """A failed collective of a multi-rank job (Gloo/NCCL timeouts and peer errors are RuntimeErrors)."""
    return world_size > 1 and isinstance(error, RuntimeError) and bool(_COLLECTIVE.search(str(error)))


def unanswered_ranks(rank: int, world_size: int, env: Mapping[str, str], probe_s: float = PROBE_S) -> list[int] | None:
    """The ranks that did not check in at the rendezvous store within `probe_s` (None: no store reachable)."""
    try:
        import torch.distributed as dist

        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=5), wait_for_workers=False)
    except Exception:
        return None
    prefix = f"rgan/check-in/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store.set(f"{prefix}{rank}", "1")
        deadline = time.monotonic() + probe_s
        missing = [r for r in range(world_size) if r != rank]
        while missing and time.monotonic() < deadline:
            time.sleep(0.5)
            missing = [r for r in missing if not store.check([f"{prefix}{r}"])]
        return missing
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            del store


def collective_failure_line(error: BaseException, *, rank: int, world_size: int, timeout_s: int,
                            env: Mapping[str, str]) -> str:
    """One line for a healthy rank whose collective failed: which rank(s) did not answer, and what the
    backend said (its first line, shortened)."""
    missing = unanswered_ranks(rank, world_size, env)
    if missing is None and world_size == 2:
        missing = [1 - rank]
    if missing:
        who = (f"rank {missing[0]} did not answer" if len(missing) == 1 else
               f"ranks {', '.join(map(str, missing))} did not answer")
        who += " (stalled, stopped or dead: see its host and its log)"
    elif missing == []:
        who = "every rank is alive: a collective was cut short (network, or a rank ahead in another collective)"
    else:
        who = "the rank that did not answer cannot be told (no rendezvous store reachable)"
    said = " ".join(str(error).split())
    said = re.sub(r"^\[[^\]]*\]\s*", "", said)[:160]  # Gloo's "[/path/to/file.cc:78] " prefix
    return (f"rank {rank} of {world_size}: a collective failed (dist.timeout_s={timeout_s}): {who}; "
            f"backend said: {said}")
