"""DDP and DeepSpeed on CPU with gloo: real multi-process jobs under torchrun (and the deepspeed launcher).

Every job runs `python -m torch.distributed.run ... -m launcher train` (or tests/dist_worker.py where a
test must control the input stream) in its own process group with a timeout; a test fails on a
non-zero exit unless the failure is what it checks. DeepSpeed jobs are few on purpose: each pays
DeepSpeed's import and engine set-up (~15-20 s on 2 cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DEMO, ROOT, free_port
from dist_worker import DEEPSPEED_EQUIV, EQUIV_SETUPS
from jobs import (
    JOB,
    assert_ranks_identical,
    assert_same_training_state,
    ckpt,
    deepspeed_launcher,
    job_env,
    ok,
    run_job,
    torchrun,
)

from rgan_dist.checkpoint import CheckpointManager, load_checkpoint
from rgan_dist.config import load_config
from rgan_dist.engine.deepspeed import deepspeed_config
from rgan_dist.engine.faults import FAULT_ENV, parse_faults
from rgan_dist.engine.loop import train
from rgan_dist.errors import ConfigError, UsageError
from rgan_dist.models import build_models

# A gradient penalty exercises double backward through the wrapped D; BatchNorm stays in G.
PENALTY = ["loss.penalty=r1", "model.d_batch_norm=false"]
ZERO2 = 'dist.deepspeed_config={"zero_optimization": {"stage": 2}}'


# ---- fast checks (no processes) --------------------------------------------------------------------

def test_deepspeed_config_is_validated_before_any_process_starts(tmp_path):
    def cfg(spec: str, *extra: str):
        return load_config(None, ["dist.strategy=deepspeed", f"dist.deepspeed_config={spec}", *extra])

    out = deepspeed_config(cfg('{"zero_optimization": {"stage": 2}}', "train.batch_size=4"), world_size=8)
    assert out["train_micro_batch_size_per_gpu"] == 4 and out["train_batch_size"] == 32
    assert out["gradient_clipping"] == 0.0 and out["zero_optimization"]["stage"] == 2
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 1}, "gradient_clipping": 2.0}')
    out = deepspeed_config(cfg(str(tmp_path / "ds.json")), world_size=1)
    assert out["zero_optimization"]["stage"] == 1 and out["gradient_clipping"] == 2.0
    for shipped in sorted((ROOT / "configs" / "deepspeed").glob("*.json")):
        deepspeed_config(cfg(str(shipped)), world_size=2)
    bad = [('{"zero_optimization": {"stage": 3}}', "stage=3 not supported"),
           ('{"optimizer": {"type": "Adam"}}', "'optimizer' is decided by rgan-dist"),
           ('{"bf16": {"enabled": true}}', "train.precision=bf16"),
           ('{"train_micro_batch_size_per_gpu": 7}', "contradicts the run"),
           ('{"zero_optimization": ', "does not parse"),
           (str(tmp_path / "missing.json"), "no such file")]
    for spec, message in bad:
        with pytest.raises(ConfigError, match=message):
            deepspeed_config(cfg(spec), world_size=2)
    # The global batch needs the launcher's world size, so that one check waits for the strategy.
    with pytest.raises(ConfigError, match="train_batch_size=8 contradicts the run"):
        deepspeed_config(cfg('{"train_batch_size": 8}', "train.batch_size=4"), world_size=4)
    with pytest.raises(ConfigError, match="fp16: not supported with dist.strategy=deepspeed"):
        cfg("", "train.precision=fp16")
    with pytest.raises(ConfigError, match="sync_batchnorm=true: only with dist.strategy=ddp"):
        load_config(None, ["dist.sync_batchnorm=true"])
    # A YAML mapping (also `key={...}` on the command line) is kept as JSON text.
    inline = load_config(None, ["dist.strategy=deepspeed", ZERO2]).dist.deepspeed_config
    assert inline == '{"zero_optimization": {"stage": 2}}'


def test_fault_spec_parsing():
    f = parse_faults("raise@3:rank1, kill@5:rank0:restart1,killsave@4,hang@2")
    assert [(x.action, x.event, x.step, x.rank, x.restart) for x in f] == [
        ("raise", "step", 3, 1, 0), ("kill", "step", 5, 0, 1), ("kill", "save", 4, None, 0),
        ("hang", "step", 2, None, 0)]
    for spec in ("boom@3", "raise", "raise@x", "raise@3:node1"):
        with pytest.raises(UsageError, match="ACTION@STEP"):
            parse_faults(spec)


def test_sidecar_folders_are_pruned_with_their_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        m.sidecar(step).mkdir(parents=True)
        m.save(step, {"step": step})
    m.sidecar(4).mkdir()  # a DeepSpeed folder whose .pt was never written (job killed mid-save)
    (tmp_path / ".ckpt-00000004.pt.tmp-999999").write_bytes(b"torn")
    m.sidecar(5).mkdir()
    m.save(5, {"step": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000003.ds", "ckpt-00000003.pt", "ckpt-00000003.pt.sha256", "ckpt-00000005.ds", "ckpt-00000005.pt",
        "ckpt-00000005.pt.sha256", "latest"]
    assert m.sidecar_of(m.latest()) == m.sidecar(5)


# ---- DDP -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_world_of_one_as_a_plain_process(tmp_path):
    """No launcher, no RANK/MASTER_* variables: strategy=ddp fills them in and runs as world size 1."""
    proc = run_job([sys.executable, "-m", "launcher", "train", "--config", str(DEMO), *JOB, "dist.strategy=ddp",
                 "train.steps=2", f"run.out_dir={tmp_path}"], timeout=120)
    assert "strategy ddp x1" in ok(proc)
    assert_ranks_identical(ckpt(tmp_path, 2), world=1)


@pytest.mark.slow
@pytest.mark.timeout(600)  # > its jobs' own timeouts: 3 x 180 s
def test_ddp_two_ranks_identical_resume_exact_and_loads_single_process(tmp_path, capsys):
    straight = ok(torchrun(tmp_path / "a", "dist.strategy=ddp", *PENALTY, "train.steps=6", "checkpoint.every=3"))
    assert "strategy ddp x2" in straight
    ok(torchrun(tmp_path / "b", "dist.strategy=ddp", *PENALTY, "train.steps=3"))
    resumed = ok(torchrun(tmp_path / "b", "dist.strategy=ddp", *PENALTY, "train.steps=6", "--resume", "auto"))
    assert "resumed from" in resumed and "at step 3" in resumed
    a, b = ckpt(tmp_path / "a", 6), ckpt(tmp_path / "b", 6)
    assert_ranks_identical(a, world=2)
    assert_same_training_state(a, b)  # bitwise: 3 + 3 steps == 6 straight, on every rank's stream
    for opt in ("opt_g", "opt_d"):
        for i, s in a["model"][opt]["state"].items():
            assert torch.equal(s["exp_avg_sq"], b["model"][opt]["state"][i]["exp_avg_sq"])
    # A DDP checkpoint has the plain module keys: single-process code loads it strictly.
    cfg = load_config(DEMO, JOB)
    m = cfg.model
    G, D = build_models(m.arch, resolution=m.resolution, z_dim=m.z_dim, width=m.width, max_width=m.max_width,
                        channels=m.channels, spectral_norm=m.spectral_norm, g_batch_norm=m.g_batch_norm,
                        d_batch_norm=False, pack=m.pack)
    G.load_state_dict(a["model"]["G"])
    D.load_state_dict(a["model"]["D"])
    assert not any(k.startswith("module.") for k in a["model"]["G"])
    # ...and a single process resumes training from it (2 ranks -> 1: weights and optimizers exactly; the
    # noise and data order restart from a new seed, as the printed warning says).
    # rasgan's batch means span the ranks, so 2 -> 1 ranks changes the objective: allowed explicitly.
    single = train(load_config(DEMO, [*JOB, *PENALTY, f"run.out_dir={tmp_path / 'single'}", "train.steps=7",
                                      "checkpoint.allow_config_change=[dist.world_size]",
                                      f"checkpoint.resume={tmp_path / 'a' / 'checkpoints' / 'ckpt-00000006.pt'}"]))
    assert single.step == 7 and load_checkpoint(single.checkpoint)["world_size"] == 1
    assert "written by 2 rank(s), this job has 1" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(600)  # > its jobs' own timeouts: 240 + 180 s
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_r3gan_two_ranks_of_b_match_one_process_of_2b(tmp_path, strategy):
    """r3gan (no normalisation, no buffers: reals and fakes go through D in one forward) with R3GAN's loss,
    rsgan + R1 + R2, on 2 ranks x B=4 equals one process at B=8 on the same global stream, under DDP and
    DeepSpeed ZeRO-2. A 10x learning rate moves the zero-initialised block outputs within the 4 steps."""
    common = ["model.arch=r3gan", "model.max_width=16", "model.stage_blocks=1", "loss.name=rsgan",
              "loss.penalty=r1+r2", "loss.penalty_weight=0.1", "train.steps=4", "train.ema=0.9",
              "train.lr_d=0.002", "train.lr_g=0.002"]
    dist = ["dist.strategy=ddp"] if strategy == "ddp" else ["dist.strategy=deepspeed", ZERO2]
    worker = str(ROOT / "tests" / "dist_worker.py")
    ok(run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, "equiv",
                str(tmp_path), *common, "train.batch_size=4", *dist], timeout=240))
    ok(run_job([sys.executable, worker, "equiv", str(tmp_path), *common, "train.batch_size=8"], timeout=180))
    two, single = torch.load(tmp_path / f"equiv-{strategy}-2.pt"), torch.load(tmp_path / "equiv-single-1.pt")
    moved = [k for k, v in single["G"].items() if k.endswith("project.weight") and v.abs().max() > 0]
    assert moved, "the blocks never left the identity: the check would not see them"
    for part in ("G", "D", "EMA"):
        for k, v in single[part].items():
            torch.testing.assert_close(two[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


@pytest.mark.slow
@pytest.mark.timeout(420)  # > its jobs' own timeouts: 2 x 180 s
def test_ddp_two_ranks_of_b_match_one_process_of_2b(tmp_path):
    """Same global stream of reals and noise, split over 2 ranks (B=4 each) or whole on one process (B=8).
    No BatchNorm (its statistics are per-rank by design) and per-sample losses (rsgan + r1), so the two
    runs compute the same averaged gradients up to float summation order. Tolerance: after 5 steps the
    weights agree to atol 1e-6 + rtol 1e-5 (measured: max abs difference ~4e-9)."""
    common = ["loss.name=rsgan", "loss.penalty=r1", "model.g_batch_norm=false", "model.d_batch_norm=false",
              "train.steps=5", "train.ema=0.9"]
    worker = str(ROOT / "tests" / "dist_worker.py")
    ok(run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, "equiv",
             str(tmp_path), *common, "train.batch_size=4", "dist.strategy=ddp"], timeout=180))
    ok(run_job([sys.executable, worker, "equiv", str(tmp_path), *common, "train.batch_size=8"], timeout=180))
    ddp, single = torch.load(tmp_path / "equiv-ddp-2.pt"), torch.load(tmp_path / "equiv-single-1.pt")
    for part in ("G", "D", "EMA"):
        for k, v in single[part].items():
            torch.testing.assert_close(ddp[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


@pytest.mark.slow
@pytest.mark.timeout(420)  # > its jobs' own timeouts: 2 x 180 s
def test_ddp_two_ranks_of_b_match_one_process_of_2b_with_augmentation_and_schedules(tmp_path):
    """As above with every augmentation op at adaptive p and every schedule ramp on (`dist_worker.AUGMENTED`):
    the augmentation's parameters are drawn for the global batch and sliced per rank, and ADA's statistic is
    reduced over ranks, so the two runs agree as closely, and p is the same."""
    common = ["model.g_batch_norm=false", "model.d_batch_norm=false", "train.steps=4", "train.ema=0.9",
              "train.lr_d=0.002", "train.lr_g=0.002", *EQUIV_SETUPS["rsgan-r1-augmented"]]
    worker = str(ROOT / "tests" / "dist_worker.py")
    ok(run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, "equiv",
             str(tmp_path), *common, "train.batch_size=4", "dist.strategy=ddp"], timeout=180))
    ok(run_job([sys.executable, worker, "equiv", str(tmp_path), *common, "train.batch_size=8"], timeout=180))
    ddp, single = torch.load(tmp_path / "equiv-ddp-2.pt"), torch.load(tmp_path / "equiv-single-1.pt")
    assert 0 < single["augment"]["p"].item() == ddp["augment"]["p"].item()
    for part in ("G", "D", "EMA"):
        for k, v in single[part].items():
            torch.testing.assert_close(ddp[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


@pytest.mark.slow
@pytest.mark.timeout(420)  # > its jobs' own timeouts: 2 x 180 s
def test_relativistic_batch_means_are_global_across_ranks(tmp_path):
    """Ra/Rc losses under DDP, gradient level: one D step and one G step (the Trainer's, gradients taken
    before the optimizer) on 2 ranks x B=4 equal one process on the concatenated 8 with
    loss.batch_stats=global, for every loss with a reference statistic; `local` (each rank's own mean,
    the behaviour before batch_stats existed) differs. No BatchNorm: its statistics are per rank by design.
    Tolerance 1e-5 relative to each gradient's largest entry; measured: <= 7e-7 (global), 3e-2..5e-1
    (local)."""
    common = ["model.g_batch_norm=false", "model.d_batch_norm=false"]
    worker = str(ROOT / "tests" / "dist_worker.py")
    ok(run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, "grads",
             str(tmp_path), *common, "train.batch_size=4", "dist.strategy=ddp"], timeout=180))
    ok(run_job([sys.executable, worker, "grads", str(tmp_path), *common, "train.batch_size=8"], timeout=180))
    ddp, single = torch.load(tmp_path / "grads-ddp-2.pt"), torch.load(tmp_path / "grads-single-1.pt")
    for name in ("rasgan", "ralsgan", "rahinge", "rcsgan", "rclsgan", "rchinge"):
        for phase in ("d", "g"):
            reference = single[f"{name}/global"][phase]
            scale = max(float(g.abs().max()) for g in reference)
            for i, (got, want) in enumerate(zip(ddp[f"{name}/global"][phase], reference, strict=True)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale, msg=f"{name} {phase} grad {i}")
            local = max(float((a - b).abs().max()) for a, b in zip(ddp[f"{name}/local"][phase], reference,
                                                                  strict=True))
            assert local > 1e-2 * scale, f"{name} {phase}: local batch means should change the gradient"


@pytest.mark.slow
def test_sigkill_of_a_worker_restarts_from_latest_checkpoint_and_finishes(tmp_path):
    """The README's recipe: --max-restarts, --resume auto, and torchrun's store not shared with the workers
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; with the shared store a restart can read the dead attempt's
    addresses, pytorch#135712: about one restart in two failed here without it)."""
    env = job_env(**{FAULT_ENV: "kill@5:rank1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    proc = torchrun(tmp_path, "dist.strategy=ddp", "train.steps=8", "checkpoint.every=2", "--resume", "auto",
                    launcher_args=("--max-restarts=1",), env=env)
    out = ok(proc)
    assert "rgan: warning" not in out
    assert "kill at step 5 on rank 1" in out
    assert "resumed from" in out and "ckpt-00000004.pt at step 4" in out
    final = ckpt(tmp_path, 8)
    assert final["step"] == 8 and CheckpointManager(tmp_path / "checkpoints").latest().name == "ckpt-00000008.pt"
    assert_ranks_identical(final, world=2)


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path):
    proc = torchrun(tmp_path, "dist.strategy=ddp", "train.steps=8", "checkpoint.every=2",
                    env=job_env(**{FAULT_ENV: "killsave@4:rank0"}))
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "kill at save 4 on rank 0" in proc.stdout
    d = tmp_path / "checkpoints"
    assert (d / "latest").read_text() == "ckpt-00000002.pt"
    assert not (d / "ckpt-00000004.pt").exists()
    assert list(d.glob(".ckpt-00000004.pt.tmp-*")), "the kill should have hit a half-written temp file"
    state = load_checkpoint(CheckpointManager(d).latest())
    assert state["step"] == 2 and len(state["ranks"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(420)  # > its jobs' own timeouts: 2 x 180 s, one node after the other
def test_two_nodes_on_one_machine_train_together(tmp_path):
    """Two torchrun agents (`--nnodes 2 --node_rank 0/1`, one worker each) meet through c10d rendezvous."""
    port = free_port()

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=rgan-test", f"--rdzv_conf=is_host={int(rank == 0)}", "-m", "launcher", "train",
               "--config", str(DEMO), *JOB, "dist.strategy=ddp", "train.steps=3", f"run.out_dir={tmp_path}"]
        return subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    nodes = [node(0), node(1)]
    outs = []
    try:
        for p in nodes:
            outs.append(p.communicate(timeout=180)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, out in zip(nodes, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    assert "strategy ddp x2" in "".join(outs)
    assert_ranks_identical(ckpt(tmp_path, 3), world=2)


@pytest.mark.slow
def test_a_rank_that_raises_ends_the_job_with_its_traceback(tmp_path):
    proc = torchrun(tmp_path, "dist.strategy=ddp", "train.steps=200", "dist.timeout_s=60",
                    env=job_env(**{FAULT_ENV: "raise@3:rank1"}), timeout=120)
    assert proc.returncode != 0
    assert "RuntimeError: RGAN_FAULT_INJECT: injected failure at step 3 on rank 1" in proc.stdout
    assert "rank      : 1" in proc.stdout  # torchrun's failure summary names the rank (via @record)
    assert not (tmp_path / "checkpoints" / "ckpt-00000200.pt").exists()


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_after_the_collective_timeout(tmp_path):
    proc = torchrun(tmp_path, "dist.strategy=ddp", "train.steps=200", "dist.timeout_s=5",
                    env=job_env(**{FAULT_ENV: "hang@2:rank1"}), timeout=120)
    assert proc.returncode != 0
    assert "hang at step 2 on rank 1" in proc.stdout
    assert "imeout" in proc.stdout or "imed out" in proc.stdout, proc.stdout[-3000:]


# ---- DeepSpeed --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_deepspeed_g_step_gradients_never_reach_d(tmp_path):
    """Plain process (world of one, no launcher variables), ZeRO-0/1/2, fp32 and bf16: a D update after a
    G step equals the same D update without one; the control (D not frozen) shows the check can fail."""
    ok(run_job([sys.executable, str(ROOT / "tests" / "dist_worker.py"), "leak", str(tmp_path)], timeout=240))
    results = torch.load(tmp_path / "leak.pt")
    assert [(r["stage"], r["precision"]) for r in results] == [(0, "fp32"), (1, "bf16"), (2, "fp32")]
    for r in results:
        assert r["no_grad_on_d_after_g_step"] and r["d_equal_with_and_without_g_step"], r
        assert r["control_grad_on_d"] and (r["control"] == "differs" or r["control"].startswith("raised")), r


@pytest.mark.slow
@pytest.mark.timeout(780)  # > its jobs' own timeouts: 3 x 240 s
def test_deepspeed_zero2_two_ranks_identical_resume_exact_and_matches_ddp(tmp_path):
    """Straight run under the deepspeed launcher, the split run under torchrun. Exact (bitwise) resume on
    CPU: DeepSpeed restores each rank's fp32 optimizer partition, and the arithmetic is deterministic."""
    port = free_port()
    straight = run_job([deepspeed_launcher(), "--num_gpus=2", f"--master_port={port}", "--no_local_rank", "--module",
                     "launcher", "train", "--config", str(DEMO), *JOB, f"run.out_dir={tmp_path / 'a'}",
                     "dist.strategy=deepspeed", ZERO2, *PENALTY, "train.steps=6", "checkpoint.every=3",
                     "checkpoint.keep=1"], timeout=240)
    assert "strategy deepspeed x2" in ok(straight)
    ok(torchrun(tmp_path / "b", "dist.strategy=deepspeed", ZERO2, *PENALTY, "train.steps=3", timeout=240))
    resumed = ok(torchrun(tmp_path / "b", "dist.strategy=deepspeed", ZERO2, *PENALTY, "train.steps=6",
                          "--resume", "auto", timeout=240))
    assert "at step 3" in resumed
    a, b = ckpt(tmp_path / "a", 6), ckpt(tmp_path / "b", 6)
    assert_ranks_identical(a, world=2)
    assert_same_training_state(a, b)
    # Both halves of a checkpoint exist, and keep-K pruned both halves of the older one.
    d = tmp_path / "a" / "checkpoints"
    assert a["sharded"] == "ckpt-00000006.ds" and a["model"]["zero_stage"] == 2
    assert sorted(p.name for p in (d / "ckpt-00000006.ds" / "D").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (d / "ckpt-00000003.pt").exists() and not (d / "ckpt-00000003.ds").exists()
    # Same config under DDP: same maths, so the same weights up to float summation order.
    ok(torchrun(tmp_path / "ddp", "dist.strategy=ddp", *PENALTY, "train.steps=6"))
    c = ckpt(tmp_path / "ddp", 6)
    for part in ("G", "D"):
        for k, v in c["model"][part].items():
            torch.testing.assert_close(a["model"][part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


@pytest.mark.slow
@pytest.mark.timeout(420)  # > its jobs' own timeouts: 240 + 120 s
def test_deepspeed_matches_one_process_spectral_norm_buffers_agree_and_zero1_bf16_resumes_exactly(tmp_path):
    """Every 2-rank DeepSpeed check in one job (`dist_worker.deepspeed_checks`, ~20 s here):

    - ZeRO-1 and ZeRO-2 with rsgan + R1 (paired: no batch statistic), ZeRO-2 with rasgan + R1 (global
      batch means, all-reduced inside `engine.backward`) and ZeRO-2 with rsgan + R1 under augmentation and
      schedules (`dist_worker.AUGMENTED`) at 2 x B=4: after 4 steps the weights equal one process at B=8
      (atol 1e-6 + rtol 1e-5; measured max abs difference <= 3e-8 without augmentation).
    - model.spectral_norm=true: after step 1 the u/v buffers are bitwise equal on both ranks (models from
      seed + rank gave each rank its own u/v, which DeepSpeed, broadcasting parameters only, never fixed),
      and so are the rank fingerprints, which hash these buffers now.
    - ZeRO-1 + bf16 (with spectral norm and BatchNorm in D): 3 steps, then a fresh Trainer with fresh engines
      resuming that checkpoint to step 6, equals 6 straight steps bitwise, on every rank."""
    worker = str(ROOT / "tests" / "dist_worker.py")
    ok(run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
             "deepspeed", str(tmp_path)], timeout=240))
    ok(run_job([sys.executable, worker, "reference", str(tmp_path)], timeout=120))
    for stage, setup in DEEPSPEED_EQUIV:
        ds, single = torch.load(tmp_path / f"ds-zero{stage}-{setup}.pt"), torch.load(tmp_path / f"ref-{setup}.pt")
        for part in ("G", "D", "EMA"):
            for k, v in single[part].items():
                torch.testing.assert_close(ds[part][k], v, rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {setup} {part}.{k}")
    ranks = torch.load(tmp_path / "sn.pt")
    uv = [k for k in ranks[0]["buffers"] if k.endswith(("._u", "._v"))]
    assert len(uv) == 6, sorted(ranks[0]["buffers"])
    for k in uv:
        assert torch.equal(ranks[0]["buffers"][k], ranks[1]["buffers"][k]), f"{k} differs between ranks"
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    straight, resumed = ckpt(tmp_path / "a", 6), ckpt(tmp_path / "b", 6)
    assert straight["model"]["zero_stage"] == 1 and "precision: bf16" in straight["config"]
    assert_ranks_identical(straight, world=2)
    assert_same_training_state(straight, resumed)


def test_fingerprints_hash_buffers_but_not_batchnorm_statistics(tmp_path):
    """Spectral norm's u/v must agree on every rank at every step, so the rank fingerprints hash them; BatchNorm's
    running statistics are per rank by design until checkpoints sync them, so they are left out."""
    from rgan_dist.engine.loop import Trainer
    from rgan_dist.engine.state import fingerprints

    t = Trainer(load_config(DEMO, [*JOB, "model.spectral_norm=true", f"run.out_dir={tmp_path}"]))
    before = fingerprints(t)
    with torch.no_grad():
        dict(t.strategy.D.named_buffers())["blocks.1.1.running_mean"].add_(1)
        assert fingerprints(t) == before
        dict(t.strategy.D.named_buffers())["to_logit.parametrizations.weight.0._u"].mul_(-1)
    after = fingerprints(t)
    assert after["D"] != before["D"] and after["G"] == before["G"]


def test_restart_pitfalls_are_warned_about():
    from rgan_dist.engine.distributed import restart_warnings

    cfg = load_config(None, ["dist.strategy=ddp"])
    assert restart_warnings(cfg, {}) == []
    shared = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    warnings = restart_warnings(cfg, shared)
    assert len(warnings) == 2
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in warnings[0] and "--resume auto" in warnings[1]
    resumed = load_config(None, ["dist.strategy=ddp", "checkpoint.resume=auto"])
    assert restart_warnings(resumed, {**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) == []
    # Static rendezvous (--master-port): the variable is set and torchrun still shares its store (measured,
    # see test_launch_shapes_are_told_apart_from_what_torchrun_gives_workers). It cannot restart: say what can,
    # and make a restarted attempt refuse at once instead of joining a dead attempt's store.
    from rgan_dist.engine.distributed import init_process_group

    static = {**shared, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    [warning] = restart_warnings(resumed, static)
    assert "static rendezvous" in warning and "torchrun --standalone` (one node)" in warning
    assert "--rdzv-backend c10d --rdzv-endpoint HOST:PORT" in warning
    with pytest.raises(UsageError, match="restart 1 under static rendezvous .* cannot rejoin"):
        init_process_group("gloo", 600, {**static, "TORCHELASTIC_RESTART_COUNT": "1"})


@pytest.mark.slow
def test_compiled_models_with_a_gradient_penalty(tmp_path):
    """aot_autograd cannot double-backward: a D step with the penalty runs eager, the rest compiled (DDP(1))."""
    proc = run_job([sys.executable, "-m", "launcher", "train", "--config", str(DEMO), *JOB, *PENALTY,
                 "train.compile=true", "train.steps=2", f"run.out_dir={tmp_path}"], timeout=300)
    ok(proc)
    assert ckpt(tmp_path, 2)["step"] == 2


# ---- launch shapes and a bounded process-group init -------------------------------------------------

@pytest.mark.slow
def test_launch_shapes_are_told_apart_from_what_torchrun_gives_workers(tmp_path):
    """With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --max-restarts, only static rendezvous (`--master-port`)
    is flagged; --standalone and c10d (the shapes that restart) are not. Real torchrun, a tiny worker."""
    worker = tmp_path / "shape.py"
    worker.write_text("import os\nfrom rgan_dist.engine.distributed import static_rendezvous_with_restarts as f\n"
                      "if os.environ['RANK'] == '0':\n    print('STATIC', f(os.environ))\n")
    shapes = {"standalone": ["--standalone"], "static": ["--nnodes=1", f"--master_port={free_port()}"],
              "c10d": ["--nnodes=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}"]}
    env = job_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONPATH=str(ROOT))  # the worker imports this checkout
    seen = {}
    for name, args in shapes.items():
        out = ok(run_job([sys.executable, "-m", "torch.distributed.run", *args, "--nproc_per_node=2",
                          "--max-restarts=1", str(worker)], timeout=120, env=env))
        seen[name] = [line for line in out.splitlines() if line.startswith("STATIC")]
    assert seen == {"standalone": ["STATIC False"], "static": ["STATIC True"], "c10d": ["STATIC False"]}


@pytest.mark.slow
def test_a_restart_under_static_rendezvous_fails_at_once_with_what_works(tmp_path):
    """Before: the restarted workers joined the dead attempt's store (here: a Gloo traceback; reported
    elsewhere: a silent hang for over 7 minutes). Now: a warning at start, and the restart refuses in seconds."""
    env = job_env(**{FAULT_ENV: "kill@3:rank1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--master_port={free_port()}",
           "--nproc_per_node=2", "--max-restarts=1", "-m", "launcher", "train", "--config", str(DEMO), *JOB,
           f"run.out_dir={tmp_path}", "dist.strategy=ddp", "train.steps=6", "checkpoint.every=2", "--resume", "auto"]
    proc = run_job(cmd, timeout=120, env=env)
    assert proc.returncode != 0
    assert "rgan: warning: torchrun --max-restarts with static rendezvous" in proc.stdout
    assert "kill at step 3 on rank 1" in proc.stdout
    refused = [line for line in proc.stdout.splitlines() if "restart 1 under static rendezvous" in line]
    assert refused and all(line.startswith("rgan train: error: ") for line in refused), proc.stdout[-3000:]
    assert "--standalone" in refused[0]
    assert "UsageError" not in proc.stdout  # torchrun's summary: the exit code, not a traceback of bad input
    assert CheckpointManager(tmp_path / "checkpoints").latest().name == "ckpt-00000002.pt"  # kept for --resume


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peer_never_comes_fails_within_the_init_timeout(tmp_path, rank):
    """Rank 0 waits for a peer that was never started; rank 1 dials a rendezvous nobody hosts. Both stop
    after dist.timeout_s with one line naming the address and the timeout (before: a store traceback)."""
    env = job_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launcher", "train", "--config", str(DEMO), *JOB,
                           "dist.strategy=ddp", "dist.timeout_s=2", f"run.out_dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("rgan train: error:")]
    assert f"rank {rank} of 2 could not join the process group at 127.0.0.1:{env['MASTER_PORT']}" in line
    assert "within dist.timeout_s=2 s" in line and elapsed < 60, (line, elapsed)


def test_an_init_that_outlives_its_timeout_is_ended_by_the_watchdog(tmp_path):
    """Gloo's pair connect to a dead attempt's address was seen waiting 35 minutes past dist.timeout_s=600,
    in C++ where no exception reaches (the GIL is released there, so a thread can act). Stand-in for that
    wait: an init that sleeps; the watchdog ends the process with the one line, exit 2."""
    script = ("import time, torch.distributed as dist\n"
              "from rgan_dist.engine import distributed as d\n"
              "d.INIT_GRACE_S = 1\n"
              "dist.init_process_group = lambda *a, **k: time.sleep(60)\n"
              "env = {'RANK': '1', 'WORLD_SIZE': '2', 'MASTER_ADDR': 'h', 'MASTER_PORT': '1'}\n"
              "d.init_process_group('gloo', 1, env)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=job_env(PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and time.monotonic() - t0 < 30, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines() == [
        "rgan: error: rank 1 of 2 could not join the process group at h:1 within dist.timeout_s=1 s (still "
        "waiting after 2 s): start every rank with the same MASTER_ADDR/MASTER_PORT, reachable from each node, "
        "or raise dist.timeout_s"]


@pytest.mark.slow
def test_two_ranks_agree_to_refuse_or_set_aside_another_runs_folder(tmp_path):
    """The run-folder check is collective: both ranks refuse (and exit, no rank left waiting in a collective),
    or with --overwrite rank 0 moves the old run aside and both train into the cleared folder."""
    train(load_config(DEMO, [*JOB, f"run.out_dir={tmp_path}", "train.steps=2"]))
    refused = torchrun(tmp_path, "dist.strategy=ddp", "train.steps=3", "dist.timeout_s=60", timeout=120)
    assert refused.returncode != 0
    lines = [x for x in refused.stdout.splitlines() if x.startswith("rgan train: error:")]
    assert len(lines) == 2 and all("already holds another run" in x for x in lines), refused.stdout[-3000:]
    assert [p.name for p in CheckpointManager(tmp_path / "checkpoints").rolling()] == ["ckpt-00000002.pt"]
    out = ok(torchrun(tmp_path, "dist.strategy=ddp", "train.steps=3", "--overwrite"))
    [old] = (tmp_path / "previous").iterdir()
    assert f"moved the previous run's files in this folder to {old}" in out
    assert load_checkpoint(old / "checkpoints" / "ckpt-00000002.pt")["world_size"] == 1
    assert_ranks_identical(ckpt(tmp_path, 3), world=2)
