"""Issue 18 item 4: a resume with another config. Keys that change the model or the objective are refused in
one line naming each `key old -> new` (exit 2), unless --allow-config-change lets them; safe ones are listed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import DEMO, TINY

from rgan_dist.config import dump_config, load_config
from rgan_dist.config_diff import check_resume_config, config_changes
from rgan_dist.errors import UsageError

BASE = [*TINY, "train.batch_size=8", "train.log_every=1", "tracking.enabled=false", "train.steps=2",
        "checkpoint.every=0"]


def rgan_train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = [a for i, a in enumerate(args) if a.startswith("--") or (i and args[i - 1].startswith("--"))]
    overrides = [a for a in args if a not in flags]
    return subprocess.run([sys.executable, "-m", "launcher", "train", "--config", str(DEMO), *flags, *BASE,
                           f"run.out_dir={tmp_path}/run", *overrides], capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_resume_refuses_model_and_objective_changes_in_one_line_and_allows_them_when_asked(tmp_path):
    first = rgan_train(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    # Today: loss.name rasgan -> hinge was resumed silently; a model shape change was a long load_state_dict traceback.
    line = one_error_line(rgan_train(tmp_path, "--resume", "auto", "train.steps=3", "loss.name=hinge",
                                     "model.width=16"))
    assert "loss.name 'rasgan' -> 'hinge'" in line and "model.width 8 -> 16" in line
    assert "--allow-config-change" in line and "train.steps" not in line
    # A safe change alone is accepted and listed in one info line.
    safe = rgan_train(tmp_path, "--resume", "auto", "train.steps=3", "train.log_every=2")
    assert safe.returncode == 0, safe.stderr[-2000:]
    [info] = [ln for ln in safe.stdout.splitlines() if "with config changes" in ln]
    assert "train.steps 2 -> 3" in info and "train.log_every 1 -> 2" in info
    # Allowed by a section wildcard: the objective changes on purpose, and the run says so.
    allowed = rgan_train(tmp_path, "--resume", "auto", "train.steps=4", "loss.name=hinge",
                         "--allow-config-change", "loss.*")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "loss.name 'rasgan' -> 'hinge'" in allowed.stdout and "resumed from" in allowed.stdout
    assert "only goes with --resume" in one_error_line(rgan_train(tmp_path, "--allow-config-change", "loss.*"))
    # Allowed, but the weights cannot follow a new shape: still one line, not a load_state_dict traceback.
    assert "does not fit this model" in one_error_line(
        rgan_train(tmp_path, "--resume", "auto", "train.steps=5", "model.width=16", "--allow-config-change",
                   "model.*,loss.*"))
    # A pattern that names no key is a typo, not a silent no-op.
    assert "matches no config key" in one_error_line(
        rgan_train(tmp_path, "--resume", "auto", "train.steps=5", "--allow-config-change", "los.nme"))


def test_world_size_matters_only_where_batch_means_span_the_ranks():
    old = load_config(DEMO, [*BASE, "loss.name=rasgan"])
    text = dump_config(old)
    with pytest.raises(UsageError, match=r"loss.name 'rasgan' -> 'hinge'; model.z_dim 16 -> 8; resume"):
        check_resume_config(text, load_config(DEMO, [*BASE, "loss.name=hinge", "model.z_dim=8", "train.steps=9"]),
                            old_world_size=1, world_size=1, where="ckpt")
    with pytest.raises(UsageError, match=r"dist.world_size 2 -> 1"):
        check_resume_config(text, old, old_world_size=2, world_size=1, where="ckpt")
    assert "dist.world_size 2 -> 1" in check_resume_config(
        text, load_config(DEMO, [*BASE, "loss.name=rasgan", "checkpoint.allow_config_change=[dist.world_size]"]),
        old_world_size=2, world_size=1, where="ckpt")
    paired = load_config(DEMO, [*BASE, "loss.name=rsgan"])  # per-pair loss: no batch mean, ranks don't matter
    assert "dist.world_size" in check_resume_config(dump_config(paired), paired, old_world_size=2, world_size=1,
                                                    where="ckpt")
    local = load_config(DEMO, [*BASE, "loss.batch_stats=local"])
    assert "dist.world_size 2 -> 1" in check_resume_config(dump_config(local), local, old_world_size=2, world_size=1,
                                                           where="ckpt")
    assert check_resume_config(dump_config(local), local, old_world_size=1, world_size=1, where="ckpt") is None
    # How the job starts is not a change of what it trains.
    assert config_changes(old.to_dict(), load_config(DEMO, [*BASE, "checkpoint.resume=auto"]).to_dict()) == {}


def test_a_checkpoint_from_before_a_key_existed_compares_it_as_its_default():
    """Upgrading must not make an old run unresumable: a key the stored config lacks is its default, which is
    what that run trained with. A real change of such a key is still refused."""
    cfg = load_config(DEMO, BASE)
    stored = yaml.safe_load(dump_config(cfg))
    del stored["augment"], stored["schedule"], stored["model"]["stage_blocks"]
    assert check_resume_config(yaml.safe_dump(stored), cfg, old_world_size=1, world_size=1, where="ckpt") is None
    augmented = load_config(DEMO, [*BASE, "augment.p=0.2", "augment.policy=[translation]"])
    with pytest.raises(UsageError, match=r"augment\.p 0\.0 -> 0\.2"):
        check_resume_config(yaml.safe_dump(stored), augmented, old_world_size=1, world_size=1, where="ckpt")
