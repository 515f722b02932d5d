"""Where this process runs: its rank, its device and the process group. The one entrance to distribution,
used by training (`strategy.DistributedStrategy`), `rgan eval` and `rgan fid`.

Process group. `Process.join` initialises it from the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT: torchrun and the deepspeed launcher both set them) with
`timeout=dist.timeout_s`, so a rank that hangs fails the job after that long instead of forever. Backend
`auto` is nccl on CUDA and gloo on CPU. A plain process without those variables runs as world size 1:
the defaults are filled in here, because DeepSpeed would otherwise fall into MPI discovery. `close()`
destroys the group (a DeepSpeed run without that teardown was seen to SIGABRT at interpreter exit).
Nothing here knows about G, D or strategies: the strategies build on this module, never the reverse.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from rgan_dist.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from rgan_dist.config import Config

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_launcher_env() -> bool:
    """Fill in a world of one when no launcher set the rendezvous variables; True if it did."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and int(os.environ["WORLD_SIZE"]) > 1:
            raise UsageError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not: launch with torchrun "
                             "or the deepspeed launcher, or set MASTER_ADDR and MASTER_PORT")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return True


# torchrun picks static rendezvous when --master-port is given, or --nnodes > 1 without --rdzv-backend;
# otherwise (--standalone, or one node and no port) c10d. What works with --max-restarts, measured here.
STATIC_LAUNCH = "static rendezvous (--master-port, or --nnodes > 1 without --rdzv-backend c10d)"
RESTARTABLE_LAUNCH = ("launch with `torchrun --standalone` (one node) or `--rdzv-backend c10d --rdzv-endpoint "
                      "HOST:PORT --rdzv-id ID` (several nodes)")


def static_rendezvous_with_restarts(env: Mapping[str, str]) -> bool:
    """`torchrun --max-restarts K` with static rendezvous (STATIC_LAUNCH), read off the variables torchrun gives
    its workers.

    The tell: with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, c10d rendezvous (`--standalone` included) gives
    workers TORCHELASTIC_USE_AGENT_STORE=False, the static one still True: its workers always share the
    agent's store, so restarted workers read the dead attempt's addresses: here (gloo, CPU) they failed at
    once with "Connection refused", elsewhere they were seen to hang for over 7 minutes. Without that
    variable every shape says True and they cannot be told apart; then `restart_warnings` asks for it first."""
    return (int(env.get("TORCHELASTIC_MAX_RESTARTS", 0) or 0) > 0
            and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1")


def restart_warnings(cfg: Config, env: Mapping[str, str]) -> list[str]:
    """What makes `torchrun --max-restarts K` lose work or fail after a restart, read off the environment.

    - Static rendezvous cannot restart at all (`static_rendezvous_with_restarts`); a warning, not an error,
      on the first attempt: refusing would itself trigger the restart that cannot work. A restarted attempt
      refuses before it joins (`DistributedStrategy`), instead of hanging.
    - torchrun >= 2.5 shares its rendezvous TCP store with the workers; after a restart they can read the
      dead attempt's addresses and fail to connect (pytorch/pytorch#135712, #167288; seen here with gloo,
      about one restart in two). `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` on every torchrun avoids it.
    - Without `--resume auto` a restarted job starts again from step 0."""
    if int(env.get("TORCHELASTIC_MAX_RESTARTS", 0) or 0) <= 0:
        return []
    out = []
    if static_rendezvous_with_restarts(env):
        out.append(f"torchrun --max-restarts with {STATIC_LAUNCH} cannot restart: the restarted workers reuse the "
                   f"failed attempt's store and fail or hang; {RESTARTABLE_LAUNCH}, keeping "
                   "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    elif env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        out.append("torchrun shares its rendezvous store with the workers, so a restart can read the failed "
                   "attempt's addresses (pytorch#135712): export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun, "
                   f"and {RESTARTABLE_LAUNCH}")
    if not cfg.checkpoint.resume:
        out.append("torchrun --max-restarts is set but checkpoint.resume is empty: a restart would start from "
                   "step 0; pass --resume auto")
    return out



INIT_GRACE_S = 30  # beyond dist.timeout_s, before a process-group init that torch did not time out is ended


def init_process_group(backend: str, timeout_s: int, env: Mapping[str, str], **kwargs: Any) -> None:
    """`dist.init_process_group` bounded by `dist.timeout_s`, failing with one line that says what to check.

    A rank whose peers never arrive (not started, another MASTER_ADDR/PORT, a firewall, or a restart under
    static rendezvous) otherwise ends in a store/Gloo traceback after the timeout, or waits far longer (a
    restarted worker under static rendezvous: over 35 minutes here, in Gloo's pair connect, which the timeout
    does not bound): a watchdog ends the process INIT_GRACE_S after the timeout. A restart under static
    rendezvous cannot succeed, so it fails at once."""
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)
    if restart > 0 and static_rendezvous_with_restarts(env):
        raise UsageError(f"torchrun restart {restart} under {STATIC_LAUNCH} cannot rejoin: the workers would reuse "
                         f"the failed attempt's store and fail or hang; {RESTARTABLE_LAUNCH}, with "
                         "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --resume auto (the last checkpoint is kept)")
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    hint = f"; after a torchrun restart, {RESTARTABLE_LAUNCH}" if restart else ""

    def failed(cause: str) -> str:
        return (f"rank {env.get('RANK', '?')} of {env.get('WORLD_SIZE', '?')} could not join the process group at "
                f"{where} within dist.timeout_s={timeout_s} s ({cause}): start every rank with the same "
                f"MASTER_ADDR/MASTER_PORT, reachable from each node, or raise dist.timeout_s{hint}")

    def give_up() -> None:
        # Gloo's pair connect to a stale peer address was seen to wait past the timeout (35 minutes here, in
        # C++, where no exception can reach): end the process with the same line instead.
        print(f"rgan: error: {failed(f'still waiting after {timeout_s + INIT_GRACE_S} s')}", file=sys.stderr,
              flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout_s + INIT_GRACE_S, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, TimeoutError) as e:  # torch's DistStoreError/DistNetworkError, Gloo's connect errors
        raise UsageError(failed(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")) from None
    finally:
        watchdog.cancel()



def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0, *,
                   option: str = "run.device") -> torch.device:
    """`auto` (or None): this rank's GPU when CUDA is visible, else the CPU; `cpu`; `cuda` (this rank's GPU,
    LOCAL_RANK) or `cuda:N`. A CUDA device becomes the current one, so NCCL and `torch.cuda` calls use it.
    `option` names the setting in errors (`run.device`, `--device`)."""
    name = "auto" if name is None else str(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    try:
        device = torch.device("cuda" if name == "auto" else name)
    except RuntimeError:
        raise UsageError(f"{option}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UsageError(f"{option}={name}: no CUDA device is visible; use cpu or auto")
    device = torch.device("cuda", local_rank if device.index is None else device.index)
    torch.cuda.set_device(device)
    return device


@dataclass
class Process:
    """This process in the job: rank and world size from the launcher's variables, its device, and (after
    `join`) the process group. `close()` leaves a group this process created, and only such a group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def join(self, backend: str = "auto", timeout_s: int = 600) -> None:
        """Join the process group (or use the one already initialised, e.g. by Ray Train), bounded by
        `timeout_s`. Backend `auto`: nccl on CUDA, gloo on CPU."""
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "nccl" and self.device.type != "cuda":
            raise ConfigError("dist.backend=nccl: needs CUDA devices; use gloo (or auto) on CPU")
        self.backend = backend
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            kwargs: dict[str, Any] = {}
            if self.device.type == "cuda":
                kwargs["device_id"] = self.device  # binds NCCL to this rank's GPU (barrier() needs it)
            init_process_group(backend, timeout_s, os.environ, **kwargs)
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(f"process group says rank {dist.get_rank()}/{dist.get_world_size()}, the "
                               f"environment rank {self.rank}/{self.world_size}")

    def close(self, release: Callable[[], None] = lambda: None) -> None:
        """Orderly teardown: wait for every rank, run `release` (drop the objects that hold the group: DDP
        reducers, DeepSpeed engines), then destroy the group. (Without the barrier, a rank that finished first
        while rank 0 still wrote its samples was seen to die of SIGABRT at exit, twice in about forty 2-rank
        gloo jobs here; not seen since.) After a failure the barrier is skipped: a dead peer would make it
        wait for the whole timeout."""
        if not (self.owns_group and dist.is_initialized()):
            return
        self.owns_group = False
        if sys.exc_info()[0] is None:
            with contextlib.suppress(Exception):
                dist.barrier()
        release()
        gc.collect()
        dist.destroy_process_group()


def locate(device: str | torch.device | None = "auto", *, option: str = "run.device") -> Process:
    """This process's rank (RANK, WORLD_SIZE, LOCAL_RANK; a world of one without them) and device; no group."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return Process(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=local_rank, device=resolve_device(device, local_rank, option=option))


def start(device: str | torch.device | None = "auto", *, backend: str = "auto", timeout_s: int = 600,
          option: str = "run.device") -> Process:
    """`locate`, then join the process group when a launcher started several ranks (WORLD_SIZE > 1): what
    the tools that only share work between ranks (`rgan eval`, `rgan fid`) need. Close it when done."""
    process = locate(device, option=option)
    if process.world_size > 1:
        process.join(backend, timeout_s)
    return process
