"""Fault injection, a test hook: `RGAN_FAULT_INJECT` makes a real rank of a real job fail the way production
ranks do (an exception, a SIGKILL, a SIGTERM, a hang), with nothing mocked. Every strategy fires it through
`Strategy.fault_point`."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from rgan_dist.errors import UsageError

FAULT_ENV = "RGAN_FAULT_INJECT"


@dataclass(frozen=True)
class Fault:
    """One injected failure: `action` at the end of `step` (event `step`) or while the checkpoint of
    `step` is half written (event `save`), on `rank` (None: every rank), in torchrun attempt `restart`."""

    action: str
    event: str
    step: int
    rank: int | None = None
    restart: int = 0

    def fire(self, rank: int) -> None:
        where = f"{self.event} {self.step} on rank {rank}"
        if self.action == "raise":
            raise RuntimeError(f"{FAULT_ENV}: injected failure at {where}")
        print(f"rgan: {FAULT_ENV}: {self.action} at {where}", flush=True)
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "term":  # a real pre-emption notice: the loop's own SIGTERM handler takes it
            os.kill(os.getpid(), signal.SIGTERM)
        while self.action == "hang":
            time.sleep(3600)


def parse_faults(spec: str) -> list[Fault]:
    """Parse `RGAN_FAULT_INJECT`. A test hook, not a feature: tests use it to make a real rank of a real
    job fail the way production ranks do (an exception, a SIGKILL, a SIGTERM, a hang), with nothing mocked.

    Grammar: comma-separated `ACTION@STEP[:rankR][:restartN]`; ACTION is `raise`, `kill`, `term` (SIGTERM
    to the own process, as a scheduler's pre-emption notice) or `hang` (at the end of outer step STEP) or
    `killsave` (SIGKILL while the checkpoint of STEP is written, after the temp file got its bytes and
    before the rename). Without `:rankR` every rank fires; a fault fires only in
    torchrun attempt N (TORCHELASTIC_RESTART_COUNT, default 0), so a restarted job does not fail again.
    Examples: `raise@3:rank1`, `kill@5:rank0`, `term@5:rank1`, `killsave@4:rank0`."""
    faults = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        head, *mods = item.split(":")
        action, sep, step = head.partition("@")
        rank, restart = None, 0
        try:
            if not sep or action not in ("raise", "kill", "term", "hang", "killsave"):
                raise ValueError
            for m in mods:
                if m.startswith("rank"):
                    rank = int(m[4:])
                elif m.startswith("restart"):
                    restart = int(m[7:])
                else:
                    raise ValueError
            event = "save" if action == "killsave" else "step"
            faults.append(Fault("kill" if action == "killsave" else action, event, int(step), rank, restart))
        except ValueError:
            raise UsageError(f"{FAULT_ENV}={spec!r}: expected ACTION@STEP[:rankR][:restartN] with ACTION one of "
                             "raise, kill, term, hang, killsave (e.g. raise@3:rank1)") from None
    return faults
