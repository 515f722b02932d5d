"""A training step that never waits for the device (issue 14): no host read of a tensor between logged steps.

On a GPU every host read (`.item()`, `bool(t)`, `float(t)`, ...) drains the queue, and a GAN step made
2*n_dis + 2 of them. Here `Trainer.train_step` runs non-logged steps with each such read of torch.Tensor made
to raise (`dist_worker.no_host_reads`), for one process, and for DDP and DeepSpeed (ZeRO 0/1/2) on 2 gloo
ranks; on a GPU, under `torch.cuda.set_sync_debug_mode("error")`. A non-finite step is still skipped, now on
the device (the fused Adam's `found_inf`), and `train.max_bad_steps` is checked at the next logged step.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import DEMO, ROOT, TINY
from dist_worker import nan_step_is_skipped, no_host_reads, sync_free_steps
from jobs import ok, run_job

from rgan_dist import losses
from rgan_dist.checkpoint import digest_path
from rgan_dist.config import load_config
from rgan_dist.deepspeed_config import deepspeed_settings
from rgan_dist.engine.loop import Trainer, TrainingDiverged

BASE = [*TINY, "train.batch_size=4", "train.log_every=100", "train.sample_every=0", "tracking.enabled=false",
        "data.workers=0"]


def trainer(tmp_path, *overrides: str) -> Trainer:
    return Trainer(load_config(DEMO, [*BASE, f"run.out_dir={tmp_path}", *overrides]))


def test_the_probe_sees_a_host_read():
    with no_host_reads(), pytest.raises(AssertionError, match=r"Tensor\.__bool__"):
        bool(torch.ones(()))
    assert torch.ones(()).item() == 1.0  # and leaves torch.Tensor as it was


@pytest.mark.parametrize("overrides", [
    (),
    ("loss.penalty=wgan-gp", "train.precision=bf16", "train.flip=true"),
    ("loss.name=rsgan", "loss.penalty=r1+r2", "train.n_dis=2", "model.spectral_norm=true"),
    # augmentation and every schedule (rgan_dist.augment, rgan_dist.schedules); ADA's statistic accumulates on
    # the device and is read only when p is adjusted, every augment.adjust_every steps
    ("augment.policy=[flip, rot90, translation, color, cutout]", "augment.p=0.5", "loss.penalty=r1+r2",
     "model.d_batch_norm=false", "schedule.images=64", "schedule.lr_end=1e-4", "schedule.beta2_end=0.99",
     "schedule.gamma_end=1.0", "schedule.augment_p_end=0.8", "schedule.ema_half_life=16"),
    ("augment.policy=[color]", "augment.p=adaptive", "augment.adjust_every=100"),
], ids=["default", "wgan-gp-bf16-flip", "r1r2-ndis2-sn", "augment-schedules", "augment-adaptive"])
def test_single_process_steps_read_nothing_on_the_host(tmp_path, overrides):
    t = trainer(tmp_path, *overrides)
    sync_free_steps(t)
    t.strategy.close()


def test_a_nan_step_is_skipped_on_the_device(tmp_path):
    t = trainer(tmp_path, "loss.penalty=r1")
    t.train_step()
    nan_step_is_skipped(t, bad_rank=0)
    # G's update is skipped the same way: weights and Adam state as they were, no host read on the way.
    s = t.strategy
    g_before = [p.detach().clone() for p in s.G.parameters()]
    adam_before = [v.clone() for st in s.opt["g"].state.values() for v in st.values()]
    real_g_loss = losses.g_loss
    losses.g_loss = lambda *a, **kw: real_g_loss(*a, **kw) * float("inf")
    try:
        with no_host_reads():
            out = t.train_step()
    finally:
        losses.g_loss = real_g_loss
    assert out["g_stepped"].tolist() == 0.0 and out["d_stepped"].tolist() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(g_before, s.G.parameters(), strict=True))
    adam_after = [v for st in s.opt["g"].state.values() for v in st.values()]
    assert all(torch.equal(a, b) for a, b in zip(adam_before, adam_after, strict=True))
    assert t.bad_steps_total == 2
    s.close()


@pytest.mark.parametrize("nan_steps, raised_at", [({0, 1}, 4), ({2}, None), ({5, 6, 7}, 8)])
def test_max_bad_steps_raises_at_the_next_logged_step(tmp_path, monkeypatch, nan_steps, raised_at):
    """max_bad_steps=2, logged every 4 steps: two NaN D losses in a row stop the run at the next logged step
    (also when the run recovered in between); the message names the step the limit was reached."""
    t = trainer(tmp_path, "train.steps=9", "train.max_bad_steps=2", "train.log_every=4", "checkpoint.every=0")
    real_d_loss = losses.d_loss
    monkeypatch.setattr(losses, "d_loss", lambda *a, **kw: real_d_loss(*a, **kw) * (
        float("nan") if t.step in nan_steps else 1.0))
    if raised_at is None:
        assert t.fit().bad_steps == 1
    else:
        with pytest.raises(TrainingDiverged, match=f"2 consecutive non-finite D losses at step {min(nan_steps) + 1}"):
            t.fit()
        assert t.step == raised_at
    t.strategy.close()


def test_a_checkpoint_from_before_fused_adam_resumes_sync_free(tmp_path):
    """A checkpoint whose Adam groups say `fused: None` (written before Adam was fused) must not turn the
    resumed optimizer back into the loop that refuses `found_inf`: it resumes, skips and stays sync-free."""
    first = trainer(tmp_path, "train.steps=1")
    first.fit()
    first.strategy.close()
    path = first.ckpt.latest()
    state = torch.load(path, weights_only=True)
    for key in ("opt_g", "opt_d"):
        for group in state["model"][key]["param_groups"]:
            group["fused"] = None
    torch.save(state, path)
    digest_path(path).unlink()  # a checkpoint from before fused Adam predates digests too
    t = trainer(tmp_path, "train.steps=9", f"checkpoint.resume={path}")
    assert t.step == 1 and all(g["fused"] for o in t.strategy.opt.values() for g in o.param_groups)
    sync_free_steps(t)
    nan_step_is_skipped(t, bad_rank=0)
    t.strategy.close()


def test_deepspeed_computes_no_grad_norm_without_clipping():
    def zero(spec: str) -> dict:
        cfg = load_config(None, ["dist.strategy=deepspeed", f"dist.deepspeed_config={spec}"])
        return deepspeed_settings(cfg)["zero_optimization"]

    assert zero('{"zero_optimization": {"stage": 1}}')["compute_grad_norm"] is False
    assert zero('{"zero_optimization": {"stage": 2}}')["compute_grad_norm"] is False
    assert "compute_grad_norm" not in zero('{"zero_optimization": {"stage": 0}}')  # DeepSpeed: ZeRO-1/2 only
    assert "compute_grad_norm" not in zero('{"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}')
    assert zero('{"zero_optimization": {"stage": 2, "compute_grad_norm": true}}')["compute_grad_norm"] is True


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_and_deepspeed_steps_read_nothing_on_the_host(tmp_path):
    """2 gloo ranks, one job (~25 s): DDP, then DeepSpeed ZeRO-0/1/2, each `sync_free_steps` and a NaN D loss on
    rank 1 only that every rank skips (`dist_worker.sync_free`)."""
    worker = str(ROOT / "tests" / "dist_worker.py")
    out = ok(run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                      "sync_free", str(tmp_path)], timeout=200))
    for name in ("ddp", "deepspeed-zero0", "deepspeed-zero1", "deepspeed-zero2"):
        for rank in (0, 1):
            assert f"sync-free: {name} rank {rank} ok" in out


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [(), ("train.precision=bf16", "loss.penalty=r1"),
                                       ("train.precision=fp16", "loss.penalty=r1")], ids=["fp32", "bf16-r1", "fp16-r1"])
def test_cuda_steps_do_not_synchronise(tmp_path, overrides):
    t = trainer(tmp_path, "run.device=cuda", *overrides)
    t.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    t.strategy.close()
