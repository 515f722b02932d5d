"""Issue 18 items 7 and 8, on real torchrun jobs (gloo, CPU): a SIGKILLed torchrun agent does not leave its
workers training unsupervised, and a stalled rank is named by the healthy ones. And a stop signal sent to
the whole process group (Slurm's pre-emption, `kill -- -PGID`) still ends in a final checkpoint while
DataLoader workers read the shards."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO, ROOT
from jobs import JOB, job_env


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_job(proc: subprocess.Popen, workers: list[int]) -> None:
    """torchrun starts each worker in a session of its own: the agent's group does not hold them."""
    for pid in [proc.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start_job(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launcher",
           "train", "--config", str(DEMO), *JOB, f"run.out_dir={out}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_steps(out: Path, proc: subprocess.Popen, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"job ended early (exit {proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {n} logged steps within {timeout}s")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker pids from /proc (Linux)")
def test_workers_of_a_killed_torchrun_agent_checkpoint_and_exit(tmp_path):
    out = tmp_path / "run"
    proc = _start_job(out, "train.steps=100000", "checkpoint.every=0", "dist.strategy=ddp")
    workers: list[int] = []
    try:
        _wait_for_steps(out, proc, 3, timeout=150)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)  # the agent, not its process group
        proc.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.5)
        alive = [w for w in workers if _alive(w)]
        assert not alive, f"workers {alive} still running 60 s after the torchrun agent was killed"
    finally:
        _kill_job(proc, workers)
        with_output = proc.stdout.read()
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    # without C++ stack frames (the peer probe's TCPStore timeouts fill 4 kB with them), so a rank's own error
    # shows: once in a full-suite run, rank 1 died right after the agent and its reason was cut off
    said = "\n".join(ln for ln in with_output.splitlines() if not ln.lstrip().startswith("frame #"))
    assert ckpts, f"no final checkpoint written:\n{said[-6000:]}"
    assert "is gone: stopping" in with_output, with_output[-4000:]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker pids from /proc (Linux)")
def test_a_stalled_rank_is_named_by_the_healthy_ranks_in_one_line(tmp_path):
    """Three ranks, the middle one SIGSTOPped: Gloo's timeout names nobody; the healthy ranks say rank 1."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m", "launcher",
         "train", "--config", str(DEMO), *JOB, f"run.out_dir={out}", "train.steps=100000", "checkpoint.every=0",
         "dist.strategy=ddp", "dist.timeout_s=10"],
        cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    workers: list[int] = []
    try:
        _wait_for_steps(out, proc, 3, timeout=200)
        workers = _children(proc.pid)
        [stalled] = [w for w in workers if _rank_of(w) == 1]
        os.kill(stalled, signal.SIGSTOP)
        t0 = time.monotonic()
        output, _ = proc.communicate(timeout=150)
        elapsed = time.monotonic() - t0
    finally:
        _kill_job(proc, workers)
    assert proc.returncode != 0
    errors = [ln for ln in output.splitlines() if ln.startswith("rgan train: error:")]
    assert errors, output[-4000:]
    assert all("rank 1 did not answer" in ln for ln in errors), errors
    assert not [ln for ln in output.splitlines() if ln.startswith(("[rank0]:", "[rank2]:"))], output[-4000:]
    assert elapsed < 120, elapsed


def _png_shards(folder: Path, n: int = 40) -> Path:
    from PIL import Image

    from data_pipeline.writer import write_shards

    images = folder / "images"
    images.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 6 % 256, 90, 200 - i)).save(images / f"{i:03d}.png")
    write_shards([str(images)], folder / "shards", 16, fmt="png", shard_size=10, shuffle=False, progress=False)
    return folder / "shards"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy, sig", [("single", signal.SIGTERM), ("ddp", signal.SIGTERM), ("ddp", signal.SIGINT)])
def test_a_stop_signal_to_the_whole_process_group_with_data_workers_still_saves_the_final_checkpoint(
        tmp_path, strategy, sig):
    """Before: the DataLoader workers died of the group's SIGTERM too, and PyTorch's SIGCHLD handler raised
    "DataLoader worker ... is killed by signal: Terminated" in the middle of the final save (one process; seen
    when a benchmark run was stopped with pkill), or a rank's next batch found its workers gone before the
    agreed stop step (DDP): a traceback, and the steps since the last checkpoint lost. Ctrl-C to the group (DDP)
    is checked beside them; it already ended in a final checkpoint, and must go on doing so."""
    out = tmp_path / "run"
    launch = ([sys.executable, "-m", "launcher"] if strategy == "single" else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launcher"])
    proc = subprocess.Popen(
        [*launch, "train", "--config", str(DEMO), *JOB, f"run.out_dir={out}", f"data.shards={_png_shards(tmp_path)}",
         "data.workers=2", "train.steps=100000", "checkpoint.every=0", f"dist.strategy={strategy}",
         "train.log_every=20"],  # ranks stop together at the next logged step: up to 20 batches still to read
        cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_steps(out, proc, 2, timeout=200)
        os.killpg(proc.pid, sig)  # every process of the job: launcher, ranks and their data workers
        output, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # torchrun's agent answers SIGTERM with a SignalException traceback of its own (torch's launcher, not the
    # run); the ranks must print none, and nothing about their data workers
    ours = [ln for ln in output.splitlines() if ln.startswith("[rank") or "DataLoader worker" in ln]
    assert not ours and "killed by signal" not in output, output[-4000:]
    # One process: no traceback of ours. Known and left open: once in a full-suite run, multiprocessing's
    # resource_sharer thread (how workers hand tensors over) printed a ConnectionResetError at shutdown, after
    # the checkpoint was written; that one is tolerated, any other fails
    ours = output.count("Traceback") - output.count("multiprocessing/resource_sharer.py")
    assert strategy != "single" or ours == 0, output[-4000:]
    assert "saving a final checkpoint" in output, output[-4000:]
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts and int(ckpts[-1].stem.split("-")[1]) >= 40, (ckpts, output[-4000:])
