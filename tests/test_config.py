"""Config system: defaults == base.yaml, inheritance, overrides, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rgan_dist.config import Config, config_from_dict, load_config
from rgan_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if "sweeps" not in p.parts)


def test_base_yaml_documents_every_key_with_the_code_defaults():
    base = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    assert base == Config().to_dict()
    text = (CONFIGS / "base.yaml").read_text().splitlines()
    for i, line in enumerate(text):  # every key line is preceded by its comment
        if line.startswith("  ") and not line.lstrip().startswith("#"):
            assert text[i - 1].lstrip().startswith("#"), f"undocumented key: {line.strip()}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_paper_presets_match_the_paper():
    c = load_config(CONFIGS / "paper/cifar10.yaml")
    assert (c.model.arch, c.train.lr_d, c.train.betas, c.train.n_dis, c.train.batch_size) == (
        "cnn32", 2e-4, [0.5, 0.999], 1, 32)
    # the WGAN-GP setup of Table 1 is reachable by override
    c2 = load_config(CONFIGS / "paper/cifar10.yaml",
                     ["train.lr_g=1e-4", "train.lr_d=1e-4", "train.betas=[0.5, 0.9]", "train.n_dis=5"])
    assert (c2.train.lr_g, c2.train.lr_d, c2.train.betas, c2.train.n_dis) == (1e-4, 1e-4, [0.5, 0.9], 5)
    c256 = load_config(CONFIGS / "paper/cat256.yaml")
    assert (c256.model.resolution, c256.model.width, c256.model.pack, c256.loss.name) == (256, 32, 2, "rasgan")
    c128 = load_config(CONFIGS / "paper/cat128.yaml")
    assert (c128.model.resolution, c128.model.width, c128.loss.name) == (128, 64, "ralsgan")


def test_extends_chain_and_precedence(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {steps: 7, lr_d: 1.0e-3}\nmodel: {width: 8}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/b.yaml").write_text("extends: ../a.yaml\ntrain: {steps: 9}\n")
    cfg = load_config(tmp_path / "sub/b.yaml", ["model.width=16"])
    assert cfg.train.steps == 9           # child beats parent
    assert cfg.train.lr_d == 1e-3         # parent beats default
    assert cfg.model.width == 16          # command line beats file
    assert cfg.train.lr_g == Config().train.lr_g  # default survives


def test_override_parsing_types():
    cfg = load_config(None, ["train.lr_d=1e-4", "train.flip=true", "train.betas=[0.0, 0.9]",
                             "run.name=x", "loss.penalty=r1+r2", "train.steps=1e3"])
    assert cfg.train.lr_d == 1e-4 and cfg.train.flip is True and cfg.train.betas == [0.0, 0.9]
    assert cfg.loss.penalty == "r1+r2" and cfg.train.steps == 1000


BAD = [
    (["train.nope=1"], "unknown key train.nope"),
    (["trian.steps=1"], "unknown section 'trian'"),
    (["loss.name=rsgann"], "loss.name='rsgann': not allowed; choose one of"),
    (["loss.penalty=gp"], "loss.penalty='gp'"),
    (["train.steps=0"], "train.steps=0: must be >= 1"),
    (["train.steps=abc"], "train.steps='abc': expected an integer"),
    (["train.steps=1.5"], "train.steps=1.5: expected an integer"),
    (["train.lr_d=0"], "train.lr_d=0: must be > 0"),
    (["train.lr_d=fast"], "train.lr_d='fast': expected a finite number"),
    (["train.betas=0.5"], "train.betas=0.5: expected a list"),
    (["train.betas=[0.5, 1.5]"], "train.betas=[0.5, 1.5]: expected two numbers in [0, 1)"),
    (["train.flip=yesplease"], "train.flip='yesplease': expected true or false"),
    (["train.precision=fp8"], "train.precision='fp8'"),
    (["dist.strategy=fsdp"], "dist.strategy='fsdp'"),
    (["model.arch=cnn32", "model.resolution=64"], "model.resolution=64: arch cnn32"),
    (["model.resolution=48"], "model.resolution=48: dcgan needs a power of two"),
    (["model.arch=r3gan", "model.resolution=48"], "model.resolution=48: r3gan needs a power of two in 8..1024"),
    (["model.arch=r3gan", "model.spectral_norm=true"], "model.spectral_norm=true: r3gan has no normalisation"),
    (["model.arch=r3gan", "model.resolution=32", "model.stage_widths=[64, 32]"],
     "model.stage_widths=[64, 32]: r3gan at 32px needs 4 positive widths"),
    (["model.arch=r3gan", "model.resolution=16", "model.stage_widths=[48, 0, 16]"],
     "model.stage_widths=[48, 0, 16]: r3gan at 16px needs 3 positive widths"),
    (["model.arch=r3gan", "model.resolution=16", "model.stage_widths=[48, 32, 16]", "model.cardinality=3"],
     "model.cardinality=3: must divide every r3gan stage width [48, 32, 16] (not 32)"),
    (["model.stage_blocks=3"], "model.stage_blocks=3: only used with model.arch=r3gan (got dcgan)"),
    (["model.arch=cnn32", "model.resolution=32", "model.cardinality=4"],
     "model.cardinality=4: only used with model.arch=r3gan (got cnn32)"),
    (["model.pack=3", "train.batch_size=32"], "train.batch_size=32: must be a multiple of model.pack=3"),
    (["train.ema=1.5"], "train.ema=1.5: must be <= 1"),
    (["steps=3"], "expected section.key=value"),
    (["train.steps"], "expected section.key=value"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_values_give_one_line_naming_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        config_from_dict({"train": 3})


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", "--config", str(CONFIGS / "demo.yaml"), "loss.name=bogus"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "loss.name='bogus'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_cli_empty_config_is_refused_not_trained_on_defaults(tmp_path, text):
    """Issue 18 item 11: an empty file used to train the base defaults with exit 0."""
    (tmp_path / "empty.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "launcher", "train", "--config", "empty.yaml", "--print-config"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'empty.yaml' is empty" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_cli_print_config_round_trips(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", "--config", str(CONFIGS / "demo.yaml"), "--print-config",
         "train.steps=12"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert config_from_dict(yaml.safe_load(proc.stdout)).train.steps == 12
