"""The training loop on the single-process strategy: the demo config end to end, resume, guards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO, TINY

from rgan_dist.checkpoint import CheckpointManager, load_checkpoint
from rgan_dist.config import load_config
from rgan_dist.engine.loop import Trainer, TrainingDiverged, train

BASE = [*TINY, "train.batch_size=8", "train.log_every=1", "tracking.enabled=false"]


def tiny_cfg(tmp_path: Path, *extra: str):
    return load_config(DEMO, [*BASE, f"run.out_dir={tmp_path}/run", *extra])


@pytest.mark.timeout(660)  # > its jobs' own timeouts: 2 x 300 s
def test_demo_cli_runs_a_few_steps(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "demo", "train.steps=4", "train.sample_every=2", "train.log_every=2",
         "tracking.enabled=false", f"run.out_dir={tmp_path}/demo"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "demo"
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    assert (out / "checkpoints" / "ckpt-00000004.pt").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert {"d_loss", "g_loss", "d_real", "d_fake", "img_per_s"} <= set(lines[0])
    assert "ckpt-00000004.pt" in proc.stdout and "samples" in proc.stdout
    # Run again as users do: a fresh run; the first one's files are moved aside, not mixed in, not deleted.
    again = subprocess.run(
        [sys.executable, "-m", "launcher", "demo", "train.steps=2", "train.sample_every=2", "train.log_every=2",
         "tracking.enabled=false", f"run.out_dir={out}"], capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    [old] = (out / "previous").iterdir()
    assert f"moved the previous run's files in this folder to {old}" in again.stdout
    assert [p.name for p in CheckpointManager(out / "checkpoints").rolling()] == ["ckpt-00000002.pt"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [2]
    assert (old / "checkpoints" / "latest").read_text() == "ckpt-00000004.pt"
    assert [json.loads(x)["step"] for x in (old / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert sorted(p.name for p in (old / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]


@pytest.mark.parametrize("loss,penalty", [("rasgan", "none"), ("rsgan", "wgan-gp"), ("ralsgan", "r1+r2"),
                                          ("sgan", "none"), ("rahinge", "r1")])
def test_losses_and_penalties_train(tmp_path, loss, penalty):
    cfg = tiny_cfg(tmp_path, "train.steps=3", f"loss.name={loss}", f"loss.penalty={penalty}",
                   "model.d_batch_norm=false")
    result = train(cfg)
    assert result.step == 3 and result.bad_steps == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in result.last_metrics.values())


def test_d_is_frozen_during_g_step(tmp_path):
    """The G step must not leave gradients on D (they would leak into D's next update)."""
    cfg = tiny_cfg(tmp_path, "train.steps=1")
    t = Trainer(cfg)
    real = t._reals()
    t.gan.g_step(real, t.step)
    assert all(p.grad is None for p in t.strategy.D.parameters())
    assert all(p.requires_grad for p in t.strategy.D.parameters())  # unfrozen afterwards
    t.strategy.close()


@pytest.mark.parametrize("loss,draws", [("sgan", 2), ("rasgan", 3)])
def test_g_step_draws_a_fresh_real_batch_only_for_losses_that_use_it(tmp_path, monkeypatch, loss, draws):
    """n_dis=2 and train.fresh_real_for_g: a relativistic G loss takes a third batch, a non-relativistic one
    never decodes it; img/s counts the images a step consumed (a fake clock: one second per step)."""
    from rgan_dist.engine import hooks, loop

    t = Trainer(tiny_cfg(tmp_path, "train.steps=2", "train.n_dis=2", "train.fresh_real_for_g=true",
                         f"loss.name={loss}", "train.sample_every=0"))
    taken = {"n": 0}

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            taken["n"] += 1
            return next(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    t.data = Counting(t.data)
    clock = [0.0]
    fake_time = type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])})
    for module in (loop, hooks):  # the loop's clock and the throughput window's (engine.hooks.Throughput)
        monkeypatch.setattr(module, "time", fake_time)
    step = t.train_step

    def one_second_step():
        clock[0] += 1.0
        return step()

    monkeypatch.setattr(t, "train_step", one_second_step)
    result = t.fit()
    t.strategy.close()
    assert taken["n"] == 2 * draws  # two steps
    assert result.last_metrics["img_per_s"] == pytest.approx(8 * draws)  # train.batch_size=8 per step-second


def test_exact_resume_single(tmp_path):
    straight = train(tiny_cfg(tmp_path / "a", "train.steps=6", "checkpoint.every=3"))
    first = train(tiny_cfg(tmp_path / "b", "train.steps=3"))
    resumed = train(tiny_cfg(tmp_path / "b", "train.steps=6", "checkpoint.resume=auto"))
    assert first.step == 3 and resumed.step == 6
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for part in ("G", "D"):
        for k, v in a["model"][part].items():
            assert torch.equal(v, b["model"][part][k]), f"{part}.{k} differs after resume"
    for k, v in a["ema"]["module"].items():
        assert torch.equal(v, b["ema"]["module"][k])
    assert a["data"] == b["data"]


def test_non_finite_steps_are_skipped_then_fatal(tmp_path, monkeypatch):
    from rgan_dist import losses

    cfg = tiny_cfg(tmp_path, "train.steps=5", "train.max_bad_steps=3")
    real_d_loss = losses.d_loss
    calls = {"n": 0}

    def flaky(name, c_real, c_fake, **kw):
        calls["n"] += 1
        value = real_d_loss(name, c_real, c_fake, **kw)
        return value * float("nan") if calls["n"] == 2 else value

    monkeypatch.setattr(losses, "d_loss", flaky)
    result = train(cfg)
    assert result.step == 5 and result.bad_steps == 1

    monkeypatch.setattr(losses, "d_loss", lambda *a, **kw: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite D losses"):
        train(tiny_cfg(tmp_path / "x", "train.steps=5", "train.max_bad_steps=3"))


def test_keyboard_interrupt_saves_final_state(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "train.steps=50")
    t = Trainer(cfg)
    original = t.train_step

    def interrupting():
        if t.step == 4:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(t, "train_step", interrupting)
    result = t.fit()
    t.strategy.close()
    assert result.interrupted and result.step == 4
    assert CheckpointManager(cfg.checkpoint_dir).latest().name == "ckpt-00000004.pt"


def test_checkpoint_manager_keeps_last_k_and_survives_torn_write(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        m.save(step, {"step": step, "w": torch.ones(2) * step})
    assert [p.name for p in m.rolling()] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert m.latest().name == "ckpt-00000003.pt"
    (tmp_path / ".ckpt-00000004.pt.tmp-1").write_bytes(b"partial")  # a write killed half way
    assert load_checkpoint(m.latest())["step"] == 3


def test_checkpoint_manager_prunes_by_step_not_by_name(tmp_path):
    """Past step 99,999,999 the name grows a digit and sorts before older steps as text: keep-K, the
    DeepSpeed sidecars and the `latest` fallback must all go by the step number."""
    m = CheckpointManager(tmp_path, keep=2)
    steps = (99_999_998, 99_999_999, 100_000_000, 100_000_001)
    for step in steps:
        m.sidecar(step).mkdir()  # as a DeepSpeed run writes it before the .pt
        m.save(step, {"step": step})
    assert [p.name for p in m.rolling()] == ["ckpt-100000000.pt", "ckpt-100000001.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.ds")) == ["ckpt-100000000.ds", "ckpt-100000001.ds"]
    (tmp_path / "latest").unlink()  # a pointer lost: the fallback is the highest step, not the last name
    assert load_checkpoint(m.latest())["step"] == 100_000_001


def _steps(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


def test_a_fresh_run_never_mixes_into_another_runs_folder(tmp_path, capsys):
    """Before: a 2-step run into a 4-step run's folder left ckpt-2 (new) beside ckpt-4 (old), `latest` on the
    new one and both runs in metrics.jsonl. Now: exit 2 and one line, untouched; --overwrite moves it aside."""
    from launcher.cli import main

    first = tiny_cfg(tmp_path, "train.steps=4", "checkpoint.every=2", "train.sample_every=2")
    train(first)
    out, ckpts = first.out_dir, first.checkpoint_dir
    before = sorted(p.name for p in ckpts.iterdir())
    argv = ["train", "--config", str(DEMO), *BASE, f"run.out_dir={out}", "train.steps=2", "train.sample_every=2"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds another run" in err, err
    assert "--resume auto" in err and "--overwrite" in err and "ckpt-00000004.pt" in err
    assert sorted(p.name for p in ckpts.iterdir()) == before and _steps(out / "metrics.jsonl") == [1, 2, 3, 4]
    assert main([*argv, "--overwrite", "--resume", "auto"]) == 2  # contradictory: one line, nothing done

    assert main([*argv, "--overwrite"]) == 0
    [old] = (out / "previous").iterdir()
    assert [p.name for p in CheckpointManager(ckpts).rolling()] == ["ckpt-00000002.pt"]
    assert (ckpts / "latest").read_text() == "ckpt-00000002.pt" and _steps(out / "metrics.jsonl") == [1, 2]
    assert load_checkpoint(ckpts / "ckpt-00000002.pt")["config"].count("steps: 2") == 1
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == before
    assert load_checkpoint(old / "checkpoints" / "ckpt-00000004.pt")["step"] == 4
    assert _steps(old / "metrics.jsonl") == [1, 2, 3, 4]
    assert sorted(p.name for p in (old / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert [p.name for p in (out / "samples").iterdir()] == ["step_0000002.png"]
    # --resume auto is the other way in, and it continues the new run (existing resume tests pin the maths).
    assert main(["train", "--config", str(DEMO), *BASE, f"run.out_dir={out}", "train.steps=3", "--resume", "auto"]) == 0
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]


def test_overwrite_keeps_checkpoints_outside_the_run_folder_on_their_storage(tmp_path):
    """checkpoint.dir elsewhere (shared storage): its files go to <checkpoint.dir>/previous/<time>/, the run
    folder's to <run.out_dir>/previous/<time>/; a run folder with only tracker files is no run."""
    from rgan_dist.checkpoint import previous_run, set_aside

    out, ckpts = tmp_path / "run", tmp_path / "shared" / "ckpt"
    out.mkdir()
    (out / "config.yaml").write_text("x")
    assert previous_run(out, ckpts) == []
    CheckpointManager(ckpts).save(7, {"step": 7})
    (out / "metrics.jsonl").write_text("{}\n")
    found = previous_run(out, ckpts)
    assert sorted(p.name for p in found) == ["ckpt-00000007.pt", "ckpt-00000007.pt.sha256", "config.yaml", "latest",
                                             "metrics.jsonl"]
    moved = set_aside(found, out, ckpts, keep=("config.yaml",))
    assert [m.parent for m in moved] == [out / "previous", ckpts / "previous"] and moved[0].name == moved[1].name
    assert sorted(p.name for p in moved[1].iterdir()) == ["ckpt-00000007.pt", "ckpt-00000007.pt.sha256", "latest"]
    assert [p.name for p in moved[0].iterdir()] == ["metrics.jsonl"] and (out / "config.yaml").is_file()
    assert previous_run(out, ckpts) == []


def test_bad_resume_path_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", "--config", str(DEMO), "--resume", str(tmp_path / "nope.pt"),
         f"run.out_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_trains_from_webdataset_shards(tmp_path):
    """The loop reads real shards through the data pipeline's reader: the path users take."""
    from data_pipeline.writer import write_shards

    shards = tmp_path / "shards"
    manifest = write_shards(["sklearn:digits"], shards, 16, fmt="png", shard_size=400)
    assert manifest["num_samples"] == 1797 and len(manifest["shards"]) == 5
    cfg = tiny_cfg(tmp_path, "train.steps=3", f"data.shards={shards}", "model.channels=3", "data.workers=1")
    result = train(cfg)
    assert result.step == 3
    state = load_checkpoint(result.checkpoint)["data"]
    assert state["batch"] > 0 and state["skipped"] == 0
