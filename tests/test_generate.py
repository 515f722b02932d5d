"""`rgan generate` and `rgan export` on a checkpoint of a real (tiny) training run, used as a user would: the CLI
(`launcher.cli.main`, the `rgan` entry point), a fresh process that loads the exported file, and an MLflow
store holding the final generator as a model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO, ROOT, TINY
from PIL import Image

from launcher.cli import main
from rgan_dist.checkpoint import load_checkpoint
from rgan_dist.config import config_from_dict, load_config
from rgan_dist.ema import recalibrate_for
from rgan_dist.engine.loop import train
from rgan_dist.export import latent, latents, load_generator, parse_seeds, read_metadata
from rgan_dist.models import build_models
from rgan_dist.samples import to_uint8

RUN = [*TINY, "train.batch_size=4", "train.steps=3", "train.log_every=1", "train.sample_every=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny training run (EMA on, as in the demo config) shared by the tests of this file."""
    out = tmp_path_factory.mktemp("gen") / "run"
    train(load_config(DEMO, [*RUN, "tracking.enabled=false", f"run.out_dir={out}"]))
    return out


def ema_generator(run_dir: Path, ema: bool = True) -> torch.nn.Module:
    """The checkpoint's G as evaluation prepares it, built here by hand: EMA weights, BatchNorm statistics
    recalibrated for them, eval mode."""
    state = load_checkpoint(run_dir / "checkpoints" / "ckpt-00000003.pt")
    cfg = config_from_dict(yaml.safe_load(state["config"]))
    G, _ = build_models(cfg.model)
    G.load_state_dict(state["ema"]["module"] if ema else state["model"]["G"])
    if ema:
        recalibrate_for(G, cfg)
    return G.eval()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def rgan(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_png_per_seed_from_the_ema_generator_whatever_the_batch_size(run_dir, tmp_path, capsys):
    code, out, _ = rgan(capsys, "generate", "--checkpoint", run_dir, "--out", tmp_path / "a", "--seeds", "0-5",
                        "--batch-size", "4")
    assert code == 0 and "wrote 6 images (seeds 0-5)" in out and "EMA generator, step 3" in out
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f"seed{s:04d}.png" for s in range(6)]
    # other seeds beside it, another order, batch size 1: seed 3 is still the same image
    assert rgan(capsys, "generate", "--checkpoint", run_dir / "checkpoints" / "ckpt-00000003.pt", "--out",
                tmp_path / "b", "--seeds", "5,3,0", "--batch-size", "1")[0] == 0
    for s in (0, 3, 5):
        assert np.array_equal(pixels(tmp_path / "a" / f"seed{s:04d}.png"), pixels(tmp_path / "b" / f"seed{s:04d}.png"))
    # ...and it is the EMA G with recalibrated BatchNorm statistics in eval mode, on the seed's own latent
    with torch.no_grad():
        want = to_uint8(ema_generator(run_dir)(latent(3, 16).unsqueeze(0)))[0, 0].numpy()
        raw = to_uint8(ema_generator(run_dir, ema=False)(latent(3, 16).unsqueeze(0)))[0, 0].numpy()
    got = pixels(tmp_path / "a" / "seed0003.png")
    assert got.shape == (16, 16) and got.dtype == np.uint8  # one channel: a grayscale PNG at G's resolution
    assert np.array_equal(got, want) and not np.array_equal(got, raw)
    assert rgan(capsys, "generate", "--checkpoint", run_dir, "--out", tmp_path / "c", "--seeds", "3",
                "--no-ema")[0] == 0
    assert np.array_equal(pixels(tmp_path / "c" / "seed0003.png"), raw)


def test_grid_and_truncation(run_dir, tmp_path, capsys):
    code, out, _ = rgan(capsys, "generate", "--checkpoint", run_dir, "--out", tmp_path, "--num", "5", "--grid",
                        "--truncation", "0.5")
    assert code == 0 and "truncation 0.5" in out
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with Image.open(tmp_path / "grid.png") as im:  # 3 columns x 2 rows of 16 px tiles, 2 px padding
        assert im.size == (3 * 18 + 2, 2 * 18 + 2)
    z = latents(range(50), 16, truncation=0.5)
    assert z.abs().max() <= 0.5 and torch.equal(z, latents(range(50), 16, truncation=0.5))
    assert z.std() > 0.2  # redrawn inside [-psi, psi], not clamped onto its edges
    assert not torch.equal(latent(7, 16, 0.5), latent(7, 16))


def test_interpolation_strip_and_gif(run_dir, tmp_path, capsys):
    assert rgan(capsys, "generate", "--checkpoint", run_dir, "--out", tmp_path, "--seeds", "1,2")[0] == 0
    code, out, _ = rgan(capsys, "generate", "--checkpoint", run_dir, "--out", tmp_path, "--interpolate", "1", "2",
                        "--steps", "5")
    assert code == 0 and "5 frames from seed 1 to seed 2" in out
    strip = pixels(tmp_path / "interp-1-2.png")
    assert strip.shape == (20, 5 * 18 + 2, 3)
    # the ends of the walk are the two seeds' own images (slerp's end points, up to float rounding)
    for tile, seed in ((strip[2:18, 2:18, 0], 1), (strip[2:18, -18:-2, 0], 2)):
        assert np.abs(tile.astype(int) - pixels(tmp_path / f"seed{seed:04d}.png")).max() <= 1
    assert rgan(capsys, "generate", "--checkpoint", run_dir, "--out", tmp_path, "--interpolate", "1", "2",
                "--steps", "4", "--gif")[0] == 0
    with Image.open(tmp_path / "interp-1-2.gif") as gif:
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
            assert gif.size == (16, 16)
    assert gif.n_frames >= 2 and sum(durations) == 4 * 120  # identical neighbours merge, the timing stays


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/missing.pt"], "no such file"),
    (["--checkpoint", "{tmp}"], "folder holds no ckpt-*.pt"),
    (["--checkpoint", "{run}", "--seeds", "9-3"], "range '9-3' ends before it starts"),
    (["--checkpoint", "{run}", "--seeds", "0-x"], "is not a seed or a range"),
    (["--checkpoint", "{run}", "--truncation", "0"], "--truncation=0.0: must be > 0"),
    (["--checkpoint", "{run}", "--interpolate", "1", "2", "--steps", "1"], "needs >= 2 frames"),
    (["--checkpoint", "{run}/metrics.jsonl"], "not a loadable rgan-dist checkpoint"),
])
def test_bad_input_is_one_line(run_dir, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    code, _, err = rgan(capsys, "generate", *args, "--out", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("rgan generate: error: ")
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]


LOADER = """
import sys, numpy as np, torch
from rgan_dist.export import load_generator, read_metadata
G = load_generator(sys.argv[1])
meta = read_metadata(sys.argv[1])
z = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], G(z).numpy())
trainer = [m for m in sys.modules if m.startswith(("rgan_dist.engine", "deepspeed", "rgan_dist.checkpoint"))]
print(meta["z_dim"], meta["resolution"], meta["ema"], trainer)
"""


def test_export_loads_in_a_fresh_process_without_the_trainer(run_dir, tmp_path, capsys):
    code, out, _ = rgan(capsys, "export", "--checkpoint", run_dir, "--out", tmp_path / "G.safetensors")
    assert code == 0 and "load_generator" in out
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "z.npy", z.numpy())
    proc = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "G.safetensors"), str(tmp_path / "z.npy"),
                           str(tmp_path / "x.npy")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["16", "16", "true", "[]"]  # metadata; nothing of the trainer was imported
    G = ema_generator(run_dir)
    with torch.no_grad():
        assert np.allclose(np.load(tmp_path / "x.npy"), G(z).numpy(), atol=1e-6)
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "G.safetensors"))) == set(G.state_dict())  # G alone, buffers included
    meta = read_metadata(tmp_path / "G.safetensors")
    assert json.loads(meta["model"])["width"] == 8 and meta["batch_norm"].startswith("recalibrated")
    # the exported file is a source for `rgan generate` too, giving the checkpoint's images
    assert rgan(capsys, "generate", "--checkpoint", tmp_path / "G.safetensors", "--out", tmp_path / "e",
                "--seeds", "3")[0] == 0
    assert rgan(capsys, "generate", "--checkpoint", run_dir, "--out", tmp_path / "c", "--seeds", "3")[0] == 0
    assert np.array_equal(pixels(tmp_path / "e" / "seed0003.png"), pixels(tmp_path / "c" / "seed0003.png"))


@pytest.mark.parametrize("name, extra", [("G.pt", []), ("G.bin", ["--format", "torchscript"])])
def test_export_torchscript(run_dir, tmp_path, capsys, name, extra):
    assert rgan(capsys, "export", "--checkpoint", run_dir, "--out", tmp_path / name, *extra)[0] == 0
    G = load_generator(tmp_path / name)
    assert isinstance(G, torch.jit.ScriptModule) and read_metadata(tmp_path / name)["z_dim"] == "16"
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))  # not the batch size it was traced with
    with torch.no_grad():
        assert torch.allclose(G(z), ema_generator(run_dir)(z), atol=1e-6)


def test_export_bad_input_is_one_line(run_dir, tmp_path, capsys):
    code, _, err = rgan(capsys, "export", "--checkpoint", run_dir, "--out", tmp_path / "G.onnx")
    assert code == 2 and "name it *.safetensors or *.pt, or give --format" in err and err.count("\n") == 1
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception, match="not a loadable safetensors file"):
        load_generator(tmp_path / "junk.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("arch", [[], ["model.arch=r3gan", "model.stage_blocks=1"]], ids=["dcgan", "r3gan"])
def test_mlflow_run_holds_the_final_generator_as_a_model(tmp_path, arch):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(DEMO, [*RUN, *arch, f"tracking.mlflow_uri={uri}", "tracking.experiment=gen",
                             f"run.out_dir={tmp_path / 'run'}"])
    train(cfg)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gen").experiment_id])
    model_uri = run.data.tags["rgan.generator_model"]
    assert model_uri == f"runs:/{run.info.run_id}/generator"
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    inputs = model.metadata.get_input_schema().inputs[0]
    assert inputs.shape == (-1, 16) and model.metadata.get_output_schema().inputs[0].shape == (-1, 1, 16, 16)
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    images = model.predict(z.numpy())
    assert images.shape == (3, 1, 16, 16) and images.dtype == np.float32
    with torch.no_grad():
        want = load_generator(tmp_path / "run" / "generator" / "G.safetensors")(z).numpy()
    assert np.allclose(images, want, atol=1e-6) and np.abs(images).max() <= 1
    assert read_metadata(tmp_path / "run" / "generator" / "G.safetensors")["ema"] == "true"


def test_a_fresh_run_sets_aside_the_generator_an_earlier_run_exported(tmp_path):
    from rgan_dist.checkpoint import previous_run

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-00000003.pt").write_bytes(b"")
    (tmp_path / "generator").mkdir()
    assert tmp_path / "generator" in previous_run(tmp_path, tmp_path / "checkpoints")
