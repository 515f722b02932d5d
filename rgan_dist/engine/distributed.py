"""DDP and DeepSpeed strategies: the same loop, the G/D pair wrapped for many ranks.

Process group. The strategy initialises it from the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT: torchrun and the deepspeed launcher both set them) with
`timeout=dist.timeout_s`, so a rank that hangs fails the job after that long instead of forever. Backend
`auto` is nccl on CUDA and gloo on CPU. A plain process without those variables runs as world size 1:
the defaults are filled in here, because DeepSpeed would otherwise fall into MPI discovery. `close()`
destroys the group (a DeepSpeed run without that teardown was seen to SIGABRT at interpreter exit).

DDP. G and D are each wrapped; the optimizers, `g_module`/`d_module` and checkpoints use the raw modules,
so a DDP checkpoint has the plain keys (no `module.` prefix) and loads in a single process. The D phase
runs every forward through the wrapper (real, fake, and the penalty's forward on interpolates, whose
`autograd.grad(create_graph=True)` w.r.t. the *inputs* never touches DDP's parameter hooks); the one
`backward()` of loss + penalty then all-reduces D's gradients, penalty's double-backward part included.
The G phase runs G through its wrapper and D as the frozen raw module (`d_frozen`), so only G's
gradients are reduced and D gets none.

BatchNorm, the choice and why. In training mode BatchNorm normalises with the batch's own statistics,
so running statistics never change a training step; they matter only for eval and checkpoints. The
default (`dist.broadcast_buffers=false`) keeps them rank-local during training and broadcasts rank 0's
to every rank before each checkpoint and evaluation (`sync_buffers`), so saved and evaluated models are
consistent. `true` makes DDP broadcast them at every wrapped forward: on an H100 (torch 2.11) that raised
"modified by an inplace operation" in the D step, whose two forwards precede one backward.
`dist.sync_batchnorm=true` (CUDA only) converts every
BatchNorm to SyncBatchNorm: statistics over the global batch, which changes the model's maths.

DeepSpeed. Two engines (G and D), each given the project's torch Adam as a client optimizer, so the
update is the same maths as the other strategies and no DeepSpeed optimizer op has to be JIT-built.
Forwards run through the raw modules (`engine.module`): DeepSpeed 0.19 attaches backward hooks to the
output of `engine(x)` that refuse any backward but `engine.backward`, which the penalty's
`autograd.grad` and the G loss (it backpropagates through D) are not. The G step freezes D
(`requires_grad_(False)`), so D's parameters collect no gradient and none of ZeRO's gradient hooks on D
fire: nothing of the G step reaches D's next update (tests/test_distributed.py checks it). One
`engine.backward` per step (loss + penalty summed), because under ZeRO-1/2 a second backward before
`step()` silently replaces the first. bf16 is autocast over fp32 weights, as in the other strategies
(the EMA and the penalties keep fp32 weights); DeepSpeed's own `bf16`/`fp16` sections are refused.

DeepSpeed checkpoints. Under ZeRO-1/2 each rank holds a slice of the optimizer state, which rank 0
cannot write alone. Every rank calls `engine.save_checkpoint` into `ckpt-<step>.ds/` beside our
`ckpt-<step>.pt` (tags `G` and `D`, no DeepSpeed `latest` file), then rank 0 writes `ckpt-<step>.pt`
(models, EMA, every rank's RNG and data position, config) and only then moves `latest`: a job killed
during either write leaves the previous pair and pointer intact. Keep-K removes both halves together.
`ckpt-<step>.pt` alone holds the full G/D weights, so eval needs no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
import os
import socket
import sys
import threading
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rgan_dist.config import Config, deepspeed_settings
from rgan_dist.engine.strategy import Phase, Strategy
from rgan_dist.errors import ConfigError, UsageError

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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient w.r.t. each rank's input is the sum over ranks of the
    output's gradients, because every rank's loss depends on every rank's input through the sum.

    Our own eight lines rather than `torch.distributed.nn.functional.all_reduce` (the same maths, deprecated
    in torch 2.13) or `_functional_collectives` (private). The backward is a collective too: it runs on
    every rank that backpropagates a loss built from the output, i.e. on all of them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


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


class DistributedStrategy(Strategy):
    """The process group and the collectives both distributed strategies share."""

    name = "distributed"

    def __init__(self, cfg: Config) -> None:
        ensure_launcher_env()
        super().__init__(cfg)
        backend = cfg.dist.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "nccl" and self.device.type != "cuda":
            raise ConfigError("dist.backend=nccl: needs CUDA devices; use gloo (or auto) on CPU")
        self.backend = backend
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            kwargs: dict[str, Any] = {}
            if self.device.type == "cuda":
                kwargs["device_id"] = self.device  # binds NCCL to this rank's GPU (barrier() needs it)
            init_process_group(backend, cfg.dist.timeout_s, os.environ, **kwargs)
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(f"process group says rank {dist.get_rank()}/{dist.get_world_size()}, the "
                               f"environment rank {self.rank}/{self.world_size}")
        if self.is_main:
            for warning in restart_warnings(cfg, os.environ):
                print(f"rgan: warning: {warning}", flush=True)

    # ---- collectives -----------------------------------------------------------------------------

    def _tensor(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def batch_means(self, r: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m(r), m(f) over the global batch (`loss.batch_stats=global`), or this rank's (`local`).

        One all-reduce of (sum r, sum f, count r, count f) whose backward all-reduces the upstream gradient
        (`_AllReduceSum`): every rank's logits get the gradient that flows into the global mean from *all*
        ranks' losses, so after DDP/DeepSpeed average the ranks' gradients they
        equal one process's on the concatenated batch (the reasoning is in `rgan_dist.losses`). Every rank
        calls it the same number of times (the loss name is the same everywhere), as a collective must."""
        if self.cfg.loss.batch_stats == "local":
            return super().batch_means(r, f)
        parts = torch.stack([r.sum(), f.sum(), r.new_tensor(float(r.numel())), f.new_tensor(float(f.numel()))])
        total = _AllReduceSum.apply(parts)
        return total[0] / total[2], total[1] / total[3]

    def all_finite(self, *values: torch.Tensor) -> bool:
        ok = torch.isfinite(torch.stack([v.detach().float() for v in values])).all().float().reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def sync_buffers(self, modules: list[nn.Module]) -> None:
        for module in modules:
            for buf in module.buffers():
                dist.broadcast(buf.data, src=0)

    def reduce_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = list(values)
        # each value to the device first: a CPU scalar beside CUDA ones made torch.stack fail on an H100
        stacked = torch.stack([values[k].detach().float().reshape(()).to(self.device) for k in keys])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= self.world_size
        return dict(zip(keys, stacked.tolist(), strict=True))

    def any_rank(self, flag: bool) -> bool:
        t = self._tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Orderly teardown: wait for every rank, drop the wrappers that hold the group, then destroy it.
        (Without the barrier, a rank that finished first while rank 0 still wrote its samples was seen to
        die of SIGABRT at exit, twice in about forty 2-rank gloo jobs here; not seen since.)

        After a failure the barrier is skipped: a dead peer would make it wait for the whole timeout."""
        if not (self._owns_group and dist.is_initialized()):
            return
        self._owns_group = False
        if sys.exc_info()[0] is None:
            with contextlib.suppress(Exception):
                dist.barrier()
        self._release()
        gc.collect()
        dist.destroy_process_group()

    def _release(self) -> None:
        """Drop references to objects that hold the process group (DDP reducers, DeepSpeed engines)."""


# --------------------------------------------------------------------------------------------------
# DDP


class DDPStrategy(DistributedStrategy):
    name = "ddp"

    def prepare(self, G: nn.Module, D: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.cfg.dist.sync_batchnorm:
            if self.device.type != "cuda":
                raise ConfigError("dist.sync_batchnorm=true: SyncBatchNorm needs CUDA devices; set it false on CPU")
            G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
        self._place(G, D)
        self.opt = self._optimizers()
        kw: dict[str, Any] = {"device_ids": [self.device.index] if self.device.type == "cuda" else None}
        # torch >= 2.13 renamed the per-forward buffer broadcast; both still sync everything at wrap time.
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            kw["forward_sync_buffers"] = self.cfg.dist.broadcast_buffers
        else:
            kw["broadcast_buffers"] = self.cfg.dist.broadcast_buffers
        # Wrapping broadcasts rank 0's parameters and buffers: every rank starts from the same models.
        self.g_ddp = DDP(self.G, **kw)
        self.d_ddp = DDP(self.D, **kw)
        self.g, self.d, self.d_frozen, self.d_penalty = self.g_ddp, self.d_ddp, self.D, self.d_ddp
        if self.cfg.train.compile:  # compile the wrapper: DDP's graph breaks at bucket boundaries
            self.g, self.d, self.d_frozen = torch.compile(self.g_ddp), torch.compile(self.d_ddp), torch.compile(self.D)

    def _release(self) -> None:
        # The raw modules stay usable (eval, samples); only the wrappers go.
        if hasattr(self, "g_ddp"):
            del self.g_ddp, self.d_ddp
            self.g, self.d, self.d_frozen, self.d_penalty = self.G, self.D, self.D, self.D


# --------------------------------------------------------------------------------------------------
# DeepSpeed

def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one engine (see `rgan_dist.config.deepspeed_settings`)."""
    return deepspeed_settings(cfg, world_size)


class DeepSpeedStrategy(DistributedStrategy):
    name = "deepspeed"

    def __init__(self, cfg: Config) -> None:
        if cfg.train.precision == "fp16":
            raise ConfigError("train.precision=fp16: not supported with dist.strategy=deepspeed; use bf16 or fp32")
        world = int(os.environ.get("WORLD_SIZE", 1))
        self.ds_config = deepspeed_config(cfg, world)  # before any process group: bad JSON fails fast
        super().__init__(cfg)

    def prepare(self, G: nn.Module, D: nn.Module) -> None:
        import deepspeed

        if self.rank != 0 or not os.environ.get("RGAN_DEEPSPEED_VERBOSE"):
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.device.type == "cpu":
            # DeepSpeed's CPU comm backend JIT-compiles a shared-memory op (60-90 s on first use) that only
            # serves its inference all-reduce, which training never calls; mark it unavailable (this dict
            # is DeepSpeed's documented cache of op compatibility, kept for the process).
            with contextlib.suppress(Exception):
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Picks up our process group (DeepSpeed short-circuits when torch.distributed is initialised).
        deepspeed.init_distributed(dist_backend=self.backend, timeout=timedelta(seconds=self.cfg.dist.timeout_s))
        self._place(G, D)
        optimizers = self._optimizers()
        self.engines: dict[Phase, Any] = {}
        for phase, module in (("g", self.G), ("d", self.D)):
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizers[phase],
                                                   config=copy.deepcopy(self.ds_config), dist_init_required=False)
            self.engines[phase] = engine
        self.opt = {p: e.optimizer for p, e in self.engines.items()}
        self.G, self.D = self.engines["g"].module, self.engines["d"].module
        self.g, self.d, self.d_frozen, self.d_penalty = self.G, self.D, self.D, self.D
        if self.cfg.train.compile:
            self.g, self.d, self.d_frozen = torch.compile(self.G), torch.compile(self.D), torch.compile(self.D)

    def _release(self) -> None:
        if hasattr(self, "engines"):
            for engine in self.engines.values():
                with contextlib.suppress(Exception):
                    engine.destroy()
            self.engines.clear()
            self.opt = {}

    def backward_step(self, phase: Phase, loss: torch.Tensor) -> None:
        engine = self.engines[phase]
        engine.backward(loss)
        engine.step()  # all-reduces (ZeRO-0) or reduce-scatters (ZeRO-1/2), steps, zeroes the gradients

    def zero_grad(self, phase: Phase) -> None:
        self.engines[phase].zero_grad()

    def state_dict(self) -> dict[str, Any]:
        # Full weights (ZeRO-1/2 keep them replicated): enough for eval. The optimizer state is sharded
        # and lives in the `.ds` folder that `save_sharded` writes.
        return {"strategy": self.name, "G": self.g_module.state_dict(), "D": self.d_module.state_dict(),
                "zero_stage": self.ds_config["zero_optimization"]["stage"]}

    def save_sharded(self, directory: Path) -> bool:
        for phase, engine in self.engines.items():
            engine.save_checkpoint(str(directory), tag=phase.upper(), save_latest=False)
        return True

    def load_state_dict(self, state: dict[str, Any], sharded: Path | None = None) -> None:
        if state.get("strategy") != self.name:
            raise UsageError(f"checkpoint written by dist.strategy={state.get('strategy')!r}: resume it with that "
                             "strategy (a DeepSpeed run keeps its optimizer in DeepSpeed's own format)")
        if sharded is None or not sharded.is_dir():
            raise UsageError(f"checkpoint: DeepSpeed folder {str(sharded)!r} is missing on rank {self.rank}; "
                             "checkpoint.dir must be storage every node can read")
        for phase, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(sharded), tag=phase.upper(), load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise UsageError(f"checkpoint {str(sharded)!r}: DeepSpeed could not load tag {phase.upper()}")


def make(cfg: Config) -> Strategy:
    if cfg.dist.strategy == "ddp":
        return DDPStrategy(cfg)
    if cfg.dist.strategy == "deepspeed":
        return DeepSpeedStrategy(cfg)
    raise ConfigError(f"dist.strategy={cfg.dist.strategy!r}: not a distributed strategy")
