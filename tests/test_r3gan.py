"""r3gan, the normalisation-free residual pair after R3GAN (Huang et al. 2024, brownvc/R3GAN `Networks.py`):
parameter and FLOP counts from closed forms written here (no model code), shapes from 8 to 256 px, blocks that
start as the identity, the per-layer initialisation, the resamplers against the reference code's convolutions,
and a tiny run through `rgan train`, `rgan export` and `load_generator`."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import DEMO
from torch import nn
from torch.nn import functional as F

from launcher.cli import main
from rgan_dist.checkpoint import load_checkpoint
from rgan_dist.config import load_config
from rgan_dist.errors import ConfigError
from rgan_dist.export import load_generator
from rgan_dist.models import build_models, count_parameters, describe, forward_flops
from rgan_dist.models.r3gan import LRELU_GAIN, downsample2x, upsample2x

SMALL = {"width": 8, "max_width": 32, "z_dim": 16}


def block_params(w: int, card: int, e: int) -> int:
    """1x1 w -> e*w, bias, 3x3 grouped e*w -> e*w, bias, 1x1 e*w -> w; no conv bias of its own."""
    return w * e * w + e * w + (e * w) * (e * w // card) * 9 + e * w + e * w * w


def counts(widths: list[int], cards: list[int], blocks: int, e: int, z: int, C: int, pack: int = 1):
    """(G, D) parameter counts; widths and cardinalities 4x4 first."""
    trunk = sum(blocks * block_params(w, c, e) for w, c in zip(widths, cards, strict=True))
    trunk += sum(a * b for a, b in zip(widths, widths[1:], strict=False) if a != b)  # 1x1 width changes
    g = widths[0] * 16 + z * widths[0] + trunk + widths[-1] * C  # basis, Linear(z), trunk, to_rgb
    d = C * pack * widths[-1] + trunk + widths[0] * 16 + widths[0]  # from_rgb, trunk, depthwise 4x4, Linear
    return g, d


def block_weights(w: int, card: int, e: int) -> int:
    return w * e * w + (e * w) * (e * w // card) * 9 + e * w * w


def flops(widths: list[int], cards: list[int], blocks: int, e: int, z: int, C: int):
    """(G, D) forward FLOPs per image: 2 x weights x output pixels for each conv, 2 x in x out per Linear."""
    sides = [4 * 2**i for i in range(len(widths))]
    trunk = sum(blocks * block_weights(w, c, e) * s * s for w, c, s in zip(widths, cards, sides, strict=True))
    # a width change's 1x1 runs at the smaller side of the two stages: in G before up-sampling, in D after down
    trunk += sum(a * b * s * s for a, b, s in zip(widths, widths[1:], sides, strict=False) if a != b)
    g = z * widths[0] + trunk + widths[-1] * C * sides[-1] ** 2
    d = C * widths[-1] * sides[-1] ** 2 + trunk + widths[0] * 16 + widths[0]
    return 2 * g, 2 * d


# (resolution, build kwargs, widths 4x4 first, cardinalities): auto widths are width x2 per halving, capped
CASES = [
    (32, {**SMALL}, [32, 32, 16, 8], [4, 4, 2, 1]),
    (64, {**SMALL, "stage_blocks": 1, "expansion": 3}, [32, 32, 32, 16, 8], [4, 4, 4, 2, 1]),
    (256, {**SMALL, "channels": 1, "pack": 2}, [32, 32, 32, 32, 32, 16, 8], [4, 4, 4, 4, 4, 2, 1]),
    (32, {"z_dim": 16, "stage_widths": [24, 24, 12, 12], "cardinality": 3}, [24, 24, 12, 12], [3, 3, 3, 3]),
]


@pytest.mark.parametrize("R,kw,widths,cards", CASES)
def test_parameter_and_flop_counts_match_closed_forms(R, kw, widths, cards):
    torch.manual_seed(0)
    G, D = build_models("r3gan", resolution=R, **kw)
    C, pack = kw.get("channels", 3), kw.get("pack", 1)
    blocks, e = kw.get("stage_blocks", 2), kw.get("expansion", 2)
    g, d = counts(widths, cards, blocks, e, kw["z_dim"], C, pack)
    assert (count_parameters(G), count_parameters(D)) == (g, d)
    gf, df = flops(widths, cards, blocks, e, kw["z_dim"], C)
    assert forward_flops(G, torch.empty(2, kw["z_dim"])) == gf
    # D's FLOPs per image: a packed sample of `pack` images costs one forward (from_rgb reads C*pack channels)
    df += (pack - 1) * C * widths[-1] * R * R * 2
    assert forward_flops(D, torch.empty(2 * pack, C, R, R)) * pack == df
    assert "GFLOP/img" in describe(G, D)


def test_default_sizes_per_resolution():
    """Defaults (width 64, cap 1024, 2 blocks of expansion 2, width / 8 groups): pinned from the closed form."""
    expected = {32: [512, 256, 128, 64], 64: [1024, 512, 256, 128, 64],
                256: [1024, 1024, 1024, 512, 256, 128, 64]}
    for R, widths in expected.items():
        G, D = build_models(load_config(None, ["model.arch=r3gan", f"model.resolution={R}", "model.channels=3"]).model)
        g, d = counts(widths, [w // 8 for w in widths], 2, 2, 128, 3)
        assert (count_parameters(G), count_parameters(D)) == (g, d)
    assert counts(expected[32], [64, 32, 16, 8], 2, 2, 128, 3) == (3_591_872, 3_526_848)


@pytest.mark.parametrize("R", [8, 32, 64, 256])
def test_shapes(R):
    torch.manual_seed(0)
    G, D = build_models("r3gan", resolution=R, stage_blocks=1, **SMALL)
    with torch.no_grad():
        x = G(torch.randn(2, 16))
        assert x.shape == (2, 3, R, R) and D(x).shape == (2,) and D(x).dtype == torch.float32
        _, D2 = build_models("r3gan", resolution=R, pack=2, stage_blocks=1, **SMALL)
        assert D2(torch.randn(4, 3, R, R)).shape == (2,)


def test_blocks_start_as_the_identity():
    """Zero-initialised last convs: G(z) and D(x) at init equal the same networks with every block removed."""
    torch.manual_seed(0)
    G, D = build_models("r3gan", resolution=32, **SMALL)
    G_bare, D_bare = copy.deepcopy(G), copy.deepcopy(D)
    for net in (G_bare, D_bare):
        for stage in net.stages:
            stage.blocks = nn.Sequential()
    z = torch.randn(4, 16)
    x = G(z)
    assert torch.equal(x, G_bare(z)) and torch.equal(D(x), D_bare(x))
    with torch.no_grad():  # and the check has teeth: a non-zero last conv changes the output
        G.stages[1].blocks[0].project.weight.normal_()
    assert not torch.allclose(G(z), G_bare(z))


def test_initialisation_per_layer():
    torch.manual_seed(0)
    widths = [256, 256, 128]
    G, D = build_models("r3gan", resolution=16, z_dim=256, stage_widths=widths)
    L = 3 * 2  # stages x blocks: the gain of the first two convs of a block is lrelu's x L^(-1/4)
    for net in (G, D):
        for stage in net.stages:
            for block in stage.blocks:
                for conv in (block.expand, block.mix):
                    fan_in = conv.weight.shape[1] * conv.kernel_size[0] * conv.kernel_size[1]
                    want = LRELU_GAIN * L**-0.25 / math.sqrt(fan_in)
                    assert conv.weight.std().item() == pytest.approx(want, rel=0.03)
                assert torch.all(block.project.weight == 0)
                assert torch.all(block.act1.bias == 0) and torch.all(block.act2.bias == 0)
            if isinstance(getattr(stage, "transition", None), nn.Conv2d):
                w = stage.transition.weight
                assert w.std().item() == pytest.approx(1 / math.sqrt(w.shape[1]), rel=0.03)
    assert G.basis.std().item() == pytest.approx(1.0, rel=0.05)
    assert G.to_basis.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.03)
    assert D.basis.groups == 256 and D.basis.weight.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert D.to_logit.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in (*G.modules(), *D.modules()))
    assert not list(G.buffers()) and not list(D.buffers())  # so the engine runs reals and fakes in one forward
    assert sum(1 for m in G.modules() if getattr(m, "bias", None) is not None and isinstance(m, nn.Conv2d)) == 0


def test_resamplers_equal_the_reference_convolutions():
    """R3GAN's reference resamplers: the [1, 2, 1] filter convolved with [1, 1] -> outer([1, 3, 3, 1]) / 64,
    a depthwise conv_transpose2d (x4, stride 2, padding 1) up and conv2d (stride 2, padding 1) down."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    kernel = (k[:, None] * k[None, :] / 64).view(1, 1, 4, 4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    flat = x.reshape(6, 1, 8, 8)
    up = F.conv_transpose2d(flat, 4 * kernel, stride=2, padding=1).reshape(2, 3, 16, 16)
    down = F.conv2d(flat, kernel, stride=2, padding=1).reshape(2, 3, 4, 4)
    torch.testing.assert_close(upsample2x(x), up, rtol=0, atol=1e-12)
    torch.testing.assert_close(downsample2x(x), down, rtol=0, atol=1e-12)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(upsample2x(cl), up, rtol=0, atol=1e-12)


def test_output_is_raw_in_training_and_clamped_in_eval():
    torch.manual_seed(0)
    G, _ = build_models("r3gan", resolution=32, **SMALL)
    z = torch.randn(64, 16)
    raw = G(z)
    assert raw.abs().max() > 1  # no tanh, as R3GAN's G
    G.eval()
    assert torch.equal(G(z), raw.clamp(-1, 1))


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.resolution=48: r3gan needs a power of two"):
        build_models("r3gan", resolution=48)
    with pytest.raises(ConfigError, match=r"model\.spectral_norm=true"):
        build_models("r3gan", resolution=32, spectral_norm=True)
    with pytest.raises(ConfigError, match=r"model\.expansion=0"):
        build_models("r3gan", resolution=32, expansion=0)
    with pytest.raises(ConfigError, match=r"model\.cardinality=-1"):
        build_models("r3gan", resolution=32, cardinality=-1)
    with pytest.raises(ConfigError, match=r"model\.stage_blocks=3: only used with model\.arch=r3gan"):
        build_models("dcgan", resolution=32, stage_blocks=3)
    G, D = build_models("r3gan", resolution=32, g_batch_norm=True, d_batch_norm=True, **SMALL)  # ignored
    assert not any(isinstance(m, nn.BatchNorm2d) for m in (*G.modules(), *D.modules()))


def test_trains_exports_and_loads(tmp_path, capsys):
    """A tiny r3gan through `rgan train` on the embedded digits (EMA on, R1 + R2 as R3GAN), then `rgan export`:
    `load_generator` gives the checkpoint's EMA generator to 1e-6 (rebuilt from the exported config)."""
    out = tmp_path / "run"
    args = ["train", "--config", str(DEMO), "model.arch=r3gan", "model.resolution=16", "model.width=8",
            "model.max_width=16", "model.z_dim=16", "model.stage_blocks=1", "loss.name=rsgan",
            "loss.penalty=r1+r2", "loss.penalty_weight=0.1", "train.steps=4", "train.batch_size=4",
            "train.log_every=1", "train.sample_every=0", "train.progress=false", "train.ema=0.9",
            "tracking.enabled=false", f"run.out_dir={out}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "r3gan 16x16x1" in printed and "GFLOP/img" in printed
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "G.safetensors")]) == 0
    G = load_generator(tmp_path / "G.safetensors")
    ckpt = load_checkpoint(out / "checkpoints" / "ckpt-00000004.pt")
    ref, _ = build_models(load_config(DEMO, args[3:-1]).model)
    ref.load_state_dict(ckpt["ema"]["module"])
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = G(z)
        assert np.allclose(x.numpy(), ref.eval()(z).numpy(), atol=1e-6)
    assert x.abs().max() <= 1 and torch.isfinite(x).all()
