"""Multi-process jobs for the distributed tests: each runs in its own process group with its own timeout, and
checkpoints are compared across ranks and runs. Used by test_distributed.py and test_resume_shards.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import DEMO, ROOT, TINY

from rgan_dist.checkpoint import load_checkpoint
from rgan_dist.engine.distributed import LAUNCHER_ENV
from rgan_dist.engine.faults import FAULT_ENV

# What a job trains: B=4 per rank, every step logged, no sample grids, no MLflow, and the demo config's
# latent size (64) these jobs have always run with.
JOB = [*TINY, "model.z_dim=64", "train.batch_size=4", "train.log_every=1", "train.sample_every=0",
       "tracking.enabled=false"]


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (*LAUNCHER_ENV, FAULT_ENV, "TORCHELASTIC_RESTART_COUNT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


_JOB_LOGS = Path(os.environ.get("RGAN_TEST_JOB_LOGS", "")) if os.environ.get("RGAN_TEST_JOB_LOGS") else None


def run_job(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a job in its own session; on timeout kill the whole group (torchrun's workers included).
    With RGAN_TEST_JOB_LOGS=DIR every job's whole output is also kept there (for post-mortems).

    `timeout` must stay below the test's pytest timeout (pyproject's default or its @pytest.mark.timeout), so
    this message, with the job's output, is what a hung job shows."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"job timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    finally:
        # pytest-timeout's signal or a Ctrl-C interrupts communicate(): never leave the job's group running.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if _JOB_LOGS is not None:
        _JOB_LOGS.mkdir(parents=True, exist_ok=True)
        (_JOB_LOGS / f"job-{len(list(_JOB_LOGS.iterdir())):03d}-rc{proc.returncode}.log").write_text(
            " ".join(cmd) + "\n" + out)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def torchrun(out: Path, *overrides: str, nproc: int = 2, launcher_args: tuple[str, ...] = (),
             timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *launcher_args, "-m", "launcher", "train", "--config", str(DEMO), *JOB, f"run.out_dir={out}",
           *overrides]
    return run_job(cmd, timeout=timeout, env=env)


def deepspeed_launcher() -> str:
    """The `deepspeed` script of this interpreter's environment (pyenv shims can point elsewhere)."""
    script = Path(sysconfig.get_path("scripts")) / "deepspeed"
    return str(script) if script.is_file() else "deepspeed"


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def ckpt(out: Path, step: int) -> dict:
    return load_checkpoint(out / "checkpoints" / f"ckpt-{step:08d}.pt")


def assert_same_training_state(a: dict, b: dict) -> None:
    for part in ("G", "D"):
        assert a["model"][part].keys() == b["model"][part].keys()
        for k, v in a["model"][part].items():
            assert torch.equal(v, b["model"][part][k]), f"{part}.{k} differs"
    for k, v in a["ema"]["module"].items():
        assert torch.equal(v, b["ema"]["module"][k]), f"EMA {k} differs"
    assert [r["data"] for r in a["ranks"]] == [r["data"] for r in b["ranks"]]
    assert [r["fingerprint"] for r in a["ranks"]] == [r["fingerprint"] for r in b["ranks"]]


def assert_ranks_identical(state: dict, world: int) -> None:
    """Each rank hashed its own G, D and EMA parameters at save time: the hashes must all be equal."""
    ranks = state["ranks"]
    assert len(ranks) == world == state["world_size"]
    assert {"G", "D", "EMA"} <= set(ranks[0]["fingerprint"])
    assert all(r["fingerprint"] == ranks[0]["fingerprint"] for r in ranks)
    # ...while each rank kept its own noise stream and data slice.
    assert len({bytes(r["rng"]["gen"].numpy()) for r in ranks}) == world


def image_steps(files: set[str], key: str) -> list[int]:
    """Steps of the full-size images `log_image(key=..., step=...)` stored as
    `images/<key>+step+<step>+timestamp+<ms>+<uuid>.png` (beside a `+compressed.webp` thumbnail)."""
    prefix = f"images/{key}+step+"
    return sorted(int(f[len(prefix):].split("+")[0]) for f in files if f.startswith(prefix) and f.endswith(".png")
                  and "+compressed" not in f)
