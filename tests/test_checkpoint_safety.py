"""Issue 18's checkpoint promises: a checkpoint loaded is the one written (sha256 digests), a signal during a
save waits for it, a full disk is one line, and a restart logs each step once. Single process, tiny model."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import DEMO, TINY

from rgan_dist.checkpoint import CheckpointManager, load_checkpoint
from rgan_dist.config import load_config
from rgan_dist.engine.faults import FAULT_ENV
from rgan_dist.engine.loop import Trainer, train

BASE = [*TINY, "train.batch_size=8", "train.log_every=1", "tracking.enabled=false", "eval.every=0",
        "train.sample_every=0"]


def tiny_cfg(out: Path, *extra: str):
    return load_config(DEMO, [*BASE, f"run.out_dir={out}", *extra])


def cli(capsys, *args: object) -> tuple[int, str, str]:
    from launcher.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def damage(path: Path, how: str) -> None:
    """What a bad disk or a bad copy does to a file; `legacy-*`: to a file written before digests existed."""
    data = bytearray(path.read_bytes())
    if how.startswith("legacy"):
        Path(f"{path}.sha256").unlink()
    if how.endswith("flip"):  # 64 bytes in the middle: torch.load does not notice (no CRC check)
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    elif how.endswith("truncate"):
        data = data[: len(data) // 2]
    elif how.endswith("zero"):
        data = bytearray(len(data))
    path.write_bytes(bytes(data))


@pytest.fixture
def two_checkpoints(tmp_path):
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    train(tiny_cfg(out, "train.steps=4", "checkpoint.every=2"))
    ckpts = out / "checkpoints"
    assert [p.name for p in CheckpointManager(ckpts).rolling()] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    return out, ckpts


# ---- 1. integrity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flip", "truncate", "zero", "legacy-truncate"])
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_keeps_it(two_checkpoints, capsys, how):
    """Before: 64 flipped bytes in the newest checkpoint were resumed from without a word."""
    out, ckpts = two_checkpoints
    newest = ckpts / "ckpt-00000004.pt"
    damage(newest, how)
    before = newest.read_bytes()
    capsys.readouterr()
    t = Trainer(tiny_cfg(out, "train.steps=6", "checkpoint.resume=auto"))
    t.strategy.close()
    err = capsys.readouterr().err
    assert t.step == 2
    warnings = [line for line in err.splitlines() if "damaged" in line or "not a loadable" in line]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "ckpt-00000002.pt" in warnings[0], err
    assert not newest.exists() and (ckpts / "ckpt-00000004.pt.corrupt").read_bytes() == before  # kept


def test_explicit_resume_of_a_damaged_checkpoint_is_one_line_naming_the_good_one(two_checkpoints, capsys):
    out, ckpts = two_checkpoints
    damage(ckpts / "ckpt-00000004.pt", "flip")
    code, _, err = cli(capsys, "train", "--config", DEMO, *BASE, f"run.out_dir={out}", "train.steps=6",
                       "--resume", ckpts / "ckpt-00000004.pt")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "ckpt-00000004.pt" in err and "sha256" in err and str(ckpts / "ckpt-00000002.pt") in err, err
    assert (ckpts / "ckpt-00000004.pt").exists()  # an explicit path is the user's file: reported, not moved


def test_generate_and_eval_check_the_digest_best_pt_too(two_checkpoints, capsys, tmp_path):
    out, ckpts = two_checkpoints
    shutil.copy(ckpts / "ckpt-00000004.pt", ckpts / "best.pt")  # best.pt: a checkpoint with its own digest
    shutil.copy(ckpts / "ckpt-00000004.pt.sha256", ckpts / "best.pt.sha256")
    Path(ckpts / "best.pt.sha256").write_text(Path(ckpts / "best.pt.sha256").read_text().replace(
        "ckpt-00000004.pt", "best.pt"))
    assert load_checkpoint(ckpts / "best.pt")["step"] == 4
    damage(ckpts / "best.pt", "flip")
    code, _, err = cli(capsys, "generate", "--checkpoint", ckpts / "best.pt", "--out", tmp_path / "g")
    assert code == 2 and err.count("\n") == 1 and "best.pt" in err and "sha256" in err, err
    damage(ckpts / "ckpt-00000004.pt", "flip")
    code, _, err = cli(capsys, "eval", "--checkpoint", ckpts, "--num-samples", "8")
    assert code == 2 and err.count("\n") == 1 and "ckpt-00000004.pt" in err and "ckpt-00000002.pt" in err, err
    assert not list(tmp_path.glob("g/*.png"))


def test_a_checkpoint_without_digest_still_loads_with_one_info_line(two_checkpoints, capsys):
    out, ckpts = two_checkpoints
    (ckpts / "ckpt-00000004.pt.sha256").unlink()  # as written before digests existed
    capsys.readouterr()
    t = Trainer(tiny_cfg(out, "train.steps=6", "checkpoint.resume=auto"))
    t.strategy.close()
    err = capsys.readouterr().err
    assert t.step == 4 and err.count("no .sha256 digest") == 1, err


def test_deepspeed_folder_files_are_in_the_digest(tmp_path):
    """A DeepSpeed checkpoint is the .pt plus every rank's files in its .ds folder: all are checked."""
    from rgan_dist.checkpoint import CorruptCheckpoint

    m = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2):
        part = m.sidecar(step) / "D" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        part.parent.mkdir(parents=True)
        torch.save({"moment": torch.ones(8) * step}, part)
        m.save(step, {"step": step})
    listing = (tmp_path / "ckpt-00000002.pt.sha256").read_text().splitlines()
    assert [line.split("  ")[1] for line in listing] == ["ckpt-00000002.pt",
                                                       "ckpt-00000002.ds/D/zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    torch.save({"moment": torch.ones(8) * 1e5}, m.sidecar(2) / "D" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CorruptCheckpoint, match=r"zero_pp_rank_0.*newest good checkpoint there is .*ckpt-00000001"):
        load_checkpoint(tmp_path / "ckpt-00000002.pt")
    path, state = m.open_resume("auto")
    assert path.name == "ckpt-00000001.pt" and (tmp_path / "ckpt-00000002.ds.corrupt").is_dir()


# ---- 2. signals during a save ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_torch_save_waits_for_the_save(tmp_path, monkeypatch, sig):
    """Before: SIGTERM/Ctrl-C while torch.save wrote gave a RuntimeError traceback from the zip writer and no
    final checkpoint. The signal is sent from inside the save (a writer that signals on its third write)."""
    real_save = torch.save
    sent = []

    class SignallingFile:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes == 3:  # mid-file; a handler runs at the next bytecode: before these bytes are written
                sent.append(sig)
                os.kill(os.getpid(), sig)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def save(obj, f, *a, **kw):
        return real_save(obj, SignallingFile(f) if hasattr(f, "write") and not sent else f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    # Ctrl-C's disposition in a terminal, whatever this process inherited (a background job starts with
    # SIGINT ignored: test_an_ignored_sigint_stays_ignored_through_a_save)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cfg = tiny_cfg(tmp_path / "run", "train.steps=6", "checkpoint.every=2")
        result = train(cfg)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent == [sig] and result.interrupted and result.step == 2
    assert result.checkpoint == cfg.checkpoint_dir / "ckpt-00000002.pt"
    assert load_checkpoint(result.checkpoint)["step"] == 2  # digest-checked
    assert not list(cfg.checkpoint_dir.glob(".*tmp*"))


def test_an_ignored_sigint_stays_ignored_through_a_save(tmp_path, monkeypatch):
    """A process started with SIGINT ignored (`cmd &` in a script; nohup-style launchers) must not start
    obeying it during a save: two SIGINTs inside torch.save (the second would mean "stop now" where SIGINT
    is handled) change nothing, and the run ends at its last step. Before, the save's deferral handler
    caught them and re-raised into the ignored disposition, or stopped the run at the second."""
    from rgan_dist.engine.hooks import StopRequest

    real_save = torch.save
    sent = []

    def save(obj, f, *a, **kw):
        if not sent:
            for _ in range(2):
                sent.append(signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cfg = tiny_cfg(tmp_path / "run", "train.steps=6", "checkpoint.every=2")
        result = train(cfg)
        assert len(sent) == 2 and not result.interrupted and result.step == 6
        stop = StopRequest(distributed=True)  # several ranks: the loop's own handler leaves it ignored too
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert load_checkpoint(result.checkpoint)["step"] == 6


# ---- 5. disk full ------------------------------------------------------------------------------------------


def _state(step: int) -> dict:
    return {"step": step, "w": torch.ones(1 << 19) * step}  # 2 MB


def test_free_space_is_checked_first_and_pruning_makes_room(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep=2)
    m.save(1, _state(1))
    m.save(2, _state(2))
    size = (tmp_path / "ckpt-00000002.pt").stat().st_size
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=size // 2))
    m.save(3, _state(3))  # room only once ckpt-1 (pruned after this save anyway) is gone first
    assert [p.name for p in m.rolling()] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert not (tmp_path / "ckpt-00000001.pt.sha256").exists()
    one = CheckpointManager(tmp_path, keep=1)
    one.save(4, _state(4))
    assert [p.name for p in m.rolling()] == ["ckpt-00000004.pt"]
    # one checkpoint left: pruning it first would leave none, so nothing is removed and nothing written
    with pytest.raises(Exception, match=r"^no space left on .* while saving ckpt-00000005 \(needs ~2 MB, 1 MB free\); "
                                        r"previous checkpoint ckpt-00000004 is intact$") as e:
        one.save(5, _state(5))
    assert e.type.__name__ == "DiskFull"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004.pt", "ckpt-00000004.pt.sha256", "latest"]
    assert (tmp_path / "latest").read_text() == "ckpt-00000004.pt"


def test_enospc_in_the_middle_of_a_save_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep=3)
    m.save(1, _state(1))
    real_save = torch.save

    def full(obj, f, *a, **kw):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(Exception, match=r"^no space left on .* while saving ckpt-00000002 \(needs ~2 MB, \d+ MB "
                                        r"free\); previous checkpoint ckpt-00000001 is intact$"):
        m.save(2, _state(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt", "ckpt-00000001.pt.sha256", "latest"]
    assert load_checkpoint(m.latest())["step"] == 1


def test_disk_full_during_training_is_exit_2_and_one_line(two_checkpoints, capsys, monkeypatch):
    """Before: exit 1 and a 62-line traceback with ENOSPC in its middle."""
    out, ckpts = two_checkpoints
    usage = shutil.disk_usage(ckpts)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    code, _, err = cli(capsys, "train", "--config", DEMO, *BASE, f"run.out_dir={out}", "train.steps=6",
                       "checkpoint.every=2", "--resume", "auto")
    assert code == 2 and err.count("\n") == 1, err
    assert "no space left on" in err and "while saving ckpt-00000006" in err and "ckpt-00000004 is intact" in err
    assert [p.name for p in CheckpointManager(ckpts).rolling()] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert not list(ckpts.glob(".*tmp*"))


# ---- 9. metrics after a restart ----------------------------------------------------------------------------


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("tracking", [False, True])
def test_a_restart_logs_each_step_once(tmp_path, monkeypatch, tracking):
    """Before: after a crash at step 5 and a resume from the step-3 checkpoint, metrics.jsonl (and MLflow) held
    step 4 twice."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = [f"tracking.enabled={str(tracking).lower()}", f"tracking.mlflow_uri={uri}", "tracking.experiment=restart",
             "tracking.system_metrics=false"]
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "raise@5")  # the end of step 5, before it is logged: steps 1-4 are
    with pytest.raises(RuntimeError, match="injected failure"):
        train(tiny_cfg(out, "train.steps=6", "checkpoint.every=3", *extra))
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]
    monkeypatch.delenv(FAULT_ENV)
    train(tiny_cfg(out, "train.steps=6", "checkpoint.every=3", "checkpoint.resume=auto", *extra))
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert _steps(out / "metrics.jsonl.discarded") == [4]  # the interrupted attempt's, kept
    if tracking:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        [run] = client.search_runs([client.get_experiment_by_name("restart").experiment_id])
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/d_loss")) == [1, 2, 3, 4, 5, 6]
