"""G/D architectures: shapes, parameter counts against closed forms, spectral norm, BatchNorm
switches, PacGAN packing, input validation, initialisation and determinism.

Parameter counts are derived here from the layer lists below with plain arithmetic (no model code),
so a wrong depth, width, bias or BatchNorm placement shows up as a mismatch. Everything runs at tiny
widths except the paper-size constructions, which do no forward pass.

The layer lists, as the paper (Jolicoeur-Martineau, "The relativistic discriminator: a key element
missing from standard GAN", ICLR 2019, arXiv:1807.00734) trained them in its official code
(github.com/AlexiaJM/RelativisticGAN, `code/GAN_losses_iter.py`):

- `--arch 1`, our `cnn32` (CIFAR-10): the "standard CNN" of Miyato et al. (spectral normalization,
  ICLR 2018, arXiv:1802.05957). G: Linear(z -> 512*4*4); 3 x [ConvT k4 s2 p1, BN, ReLU]
  512 -> 256 -> 128 -> 64; Conv3x3 64 -> 3; Tanh. D: conv3x3 64, conv4x4s2 64, conv3x3 128,
  conv4x4s2 128, conv3x3 256, conv4x4s2 256, conv3x3 512, each followed by LeakyReLU(0.1) (and BN
  after the first six when D has BatchNorm), then Linear(512*4*4 = 8192 -> 1). Every layer has a bias.
  With spectral norm (the stable setup) it wraps every conv, not the final Linear, and D has no BN.
- `--arch 0`, our `dcgan` (CAT): depth from the image size; G: ConvT k4 blocks with BN + ReLU, Tanh
  out; D: conv k4 s2 blocks with BN (none on the first), LeakyReLU(0.2), final conv k4 -> 1; no biases.
  Width 64 at 64^2 and 128^2, 32 at 256^2 (that preset also packs 2 images for D, PacGAN-2).
- z: 128-d. Init (the official `weights_init`): conv weights N(0, 0.02), BN weight N(1, 0.02), BN bias 0;
  conv biases and Linear layers (cnn32) keep PyTorch's defaults.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from rgan_dist.errors import ConfigError
from rgan_dist.models import ARCHS, build_models, count_parameters, describe

TINY = {"width": 2, "max_width": 16, "z_dim": 8}


def conv_params(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn_params(c: int) -> int:
    return 2 * c


def dcgan_counts(R: int, w: int, max_w: int, z: int, C: int, *, g_bn: bool, d_bn: bool, pack: int = 1):
    """DCGAN: D halves R down to 4 doubling channels from w (capped); G is the mirror image."""
    d_ch, side, c = [], R // 2, w
    while True:
        d_ch.append(min(c, max_w))
        if side == 4:
            break
        side, c = side // 2, c * 2
    g_ch = d_ch[::-1]
    g = conv_params(z, g_ch[0], 4, False) + (bn_params(g_ch[0]) if g_bn else 0)
    for a, b in zip(g_ch, g_ch[1:], strict=False):
        g += conv_params(a, b, 4, False) + (bn_params(b) if g_bn else 0)
    g += conv_params(g_ch[-1], C, 4, False)
    d = conv_params(C * pack, d_ch[0], 4, False)
    for a, b in zip(d_ch, d_ch[1:], strict=False):
        d += conv_params(a, b, 4, False) + (bn_params(b) if d_bn else 0)
    d += conv_params(d_ch[-1], 1, 4, False)
    return g, d


def d_convs(D: nn.Module) -> list[nn.Conv2d]:
    return [m for m in D.modules() if isinstance(m, nn.Conv2d)]


def raw_weight(m: nn.Module) -> torch.Tensor:
    return m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight


# --------------------------------------------------------------------------------------------
# Shapes and ranges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("R", [16, 32, 64, 128, 256, 1024])
def test_dcgan_shapes_and_range(R):
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=R, channels=3, **TINY)
    assert (G.z_dim, G.resolution, G.channels, D.pack) == (8, R, 3, 1)
    x = G(torch.randn(2, 8))
    assert x.shape == (2, 3, R, R)
    assert x.abs().max() <= 1.0
    out = D(x)
    assert out.shape == (2,) and out.dtype == torch.float32


def test_cnn32_shapes():
    torch.manual_seed(0)
    G, D = build_models("cnn32", resolution=32, channels=1, **TINY)
    x = G(torch.randn(3, 8))
    assert x.shape == (3, 1, 32, 32)
    out = D(x)
    assert out.shape == (3,) and out.dtype == torch.float32


@pytest.mark.parametrize("arch,R", [("dcgan", 32), ("cnn32", 32)])
def test_generator_saturates_inside_unit_interval(arch, R):
    """Blow up the last conv's weights: outputs hit +-1 and never leave [-1, 1] (Tanh is last)."""
    torch.manual_seed(0)
    G, _ = build_models(arch, resolution=R, **TINY)
    last = [m for m in G.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)][-1]
    with torch.no_grad():
        last.weight.mul_(1e4)
        x = G(torch.randn(4, 8))
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.999 and x.max() > 0.999


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------


def test_dcgan_paper_64_counts():
    """Classic DCGAN at 64^2, width 64, z 128: G 512-256-128-64-3, D 64-128-256-512-1."""
    G, D = build_models("dcgan", resolution=64, z_dim=128, width=64)
    g = (128 * 512 * 16 + 512 * 256 * 16 + 256 * 128 * 16 + 128 * 64 * 16 + 64 * 3 * 16
         + 2 * (512 + 256 + 128 + 64))
    d = 3 * 64 * 16 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 512 * 1 * 16 + 2 * (128 + 256 + 512)
    assert (count_parameters(G), count_parameters(D)) == (g, d) == (3_806_080, 2_765_568)


@pytest.mark.parametrize(
    "R,w,max_w,g_bn,d_bn,pack",
    [(16, 4, 1024, True, True, 1), (256, 4, 16, False, True, 2), (1024, 2, 8, True, False, 1),
     (128, 3, 1024, True, True, 3)],
)
def test_dcgan_counts_closed_form(R, w, max_w, g_bn, d_bn, pack):
    G, D = build_models("dcgan", resolution=R, z_dim=10, width=w, max_width=max_w, channels=3,
                        g_batch_norm=g_bn, d_batch_norm=d_bn, pack=pack)
    assert (count_parameters(G), count_parameters(D)) == dcgan_counts(R, w, max_w, 10, 3, g_bn=g_bn,
                                                                      d_bn=d_bn, pack=pack)


def test_dcgan_width_cap_only_bites_beyond_paper_presets():
    """The paper's 256^2 preset (width 32) peaks at exactly 1024 channels: uncapped at the default."""
    g_ch = lambda G: [m.out_channels for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]  # noqa: E731
    G, _ = build_models("dcgan", resolution=256, width=32, max_width=1024)
    assert g_ch(G) == [1024, 512, 256, 128, 64, 32, 3]
    G, _ = build_models("dcgan", resolution=1024, width=1, max_width=16)
    assert g_ch(G) == [16, 16, 16, 16, 8, 4, 2, 1, 3]


def test_cnn32_paper_counts():
    """Miyato et al.'s standard CNN at width 64 (every layer biased), BN in G, none in D."""
    G, D = build_models("cnn32", resolution=32, z_dim=128, width=64, d_batch_norm=False, spectral_norm=True)
    g = (128 * 8192 + 8192) + (512 * 256 * 16 + 256) + (256 * 128 * 16 + 128) + (128 * 64 * 16 + 64) \
        + (64 * 3 * 9 + 3) + 2 * (256 + 128 + 64)
    d = (3 * 64 * 9 + 64) + (64 * 64 * 16 + 64) + (64 * 128 * 9 + 128) + (128 * 128 * 16 + 128) \
        + (128 * 256 * 9 + 256) + (256 * 256 * 16 + 256) + (256 * 512 * 9 + 512) + (512 * 4 * 4 + 1)
    assert (count_parameters(G), count_parameters(D)) == (g, d) == (3_812_355, 2_935_873)


def test_cnn32_d_batch_norm_follows_first_six_convs():
    _, D = build_models("cnn32", resolution=32, z_dim=128, width=64, d_batch_norm=True)
    bns = [m.num_features for m in D.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == [64, 64, 128, 128, 256, 256]


# --------------------------------------------------------------------------------------------
# Spectral norm, BatchNorm switches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,R", [("dcgan", 64), ("cnn32", 32)])
def test_spectral_norm_on_every_d_conv_only_when_asked(arch, R):
    torch.manual_seed(0)
    G, D = build_models(arch, resolution=R, spectral_norm=True, **TINY)
    convs = d_convs(D)
    assert len(convs) == (5 if arch == "dcgan" else 7)
    assert all(parametrize.is_parametrized(m, "weight") for m in convs)
    assert not any(parametrize.is_parametrized(m) for m in D.modules() if isinstance(m, nn.Linear))
    assert not any(parametrize.is_parametrized(m) for m in G.modules())
    # The effective weight really is normalised: largest singular value ~ 1 after a few power steps.
    D.train()
    with torch.no_grad():
        for _ in range(20):
            D(torch.randn(2, 3, R, R))
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.detach().reshape(m.weight.shape[0], -1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.02)

    _, D_plain = build_models(arch, resolution=R, spectral_norm=False, **TINY)
    assert not any(parametrize.is_parametrized(m) for m in D_plain.modules())


def test_spectral_norm_survives_deepcopy_state_dict_and_double_backward():
    torch.manual_seed(0)
    _, D = build_models("dcgan", resolution=32, spectral_norm=True, d_batch_norm=False, **TINY)
    x = torch.randn(4, 3, 32, 32)
    D.train()
    D(x)  # move u/v away from their initial values
    D.eval()
    ref = D(x)
    torch.testing.assert_close(copy.deepcopy(D)(x), ref)
    torch.manual_seed(1)
    _, D2 = build_models("dcgan", resolution=32, spectral_norm=True, d_batch_norm=False, **TINY)
    D2.load_state_dict(D.state_dict())
    D2.eval()
    torch.testing.assert_close(D2(x), ref)
    # Gradient penalty pattern: grad w.r.t. the input with create_graph, then backward to params.
    D.train()
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(D(xi).sum(), xi, create_graph=True)
    (g.flatten(1).norm(dim=1) - 1).pow(2).mean().backward()
    w = d_convs(D)[0].parametrizations.weight.original
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("arch,R", [("dcgan", 64), ("cnn32", 32)])
def test_batch_norm_switches(arch, R):
    count = lambda m: sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    G, D = build_models(arch, resolution=R, g_batch_norm=False, d_batch_norm=False, **TINY)
    assert count(G) == 0 and count(D) == 0
    G, D = build_models(arch, resolution=R, g_batch_norm=True, d_batch_norm=False, **TINY)
    assert count(G) == (4 if arch == "dcgan" else 3) and count(D) == 0
    G, D = build_models(arch, resolution=R, g_batch_norm=False, d_batch_norm=True, **TINY)
    assert count(G) == 0 and count(D) == (3 if arch == "dcgan" else 6)


def test_dcgan_d_first_block_has_no_batch_norm():
    _, D = build_models("dcgan", resolution=64, d_batch_norm=True, **TINY)
    layers = [m for m in D.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.LeakyReLU)]
    assert isinstance(layers[0], nn.Conv2d) and isinstance(layers[1], nn.LeakyReLU)
    assert layers[1].negative_slope == 0.2
    assert isinstance(layers[3], nn.BatchNorm2d)


# --------------------------------------------------------------------------------------------
# PacGAN
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,R", [("dcgan", 32), ("cnn32", 32)])
def test_pack_halves_rows_and_groups_consecutive_images(arch, R):
    torch.manual_seed(0)
    _, D = build_models(arch, resolution=R, pack=2, d_batch_norm=False, **TINY)
    assert D.pack == 2 and d_convs(D)[0].in_channels == 6
    # At width 2 cnn32's seven N(0, 0.02) convs shrink an input change ~1e-9-fold against their biases (PyTorch's
    # default init, as the official code's), below float32's resolution of the logit: packing is what is checked.
    with torch.no_grad():
        for m in d_convs(D):
            if m.bias is not None:
                m.bias.zero_()
    x = torch.randn(6, 3, R, R)
    out = D(x)
    assert out.shape == (3,)
    x2 = x.clone()
    x2[3] += 1.0  # image 3 belongs to packed sample 1 only
    out2 = D(x2)
    assert out2[0] == out[0] and out2[2] == out[2] and out2[1] != out[1]
    with pytest.raises(ValueError, match="multiple of pack"):
        D(torch.randn(5, 3, R, R))


def test_d_rejects_wrong_image_shape():
    _, D = build_models("dcgan", resolution=32, **TINY)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        D(torch.randn(2, 3, 64, 64))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,kwargs,needle",
    [
        ("dcgan", {"resolution": 48}, "model.resolution=48"),
        ("dcgan", {"resolution": 8}, "model.resolution=8"),
        ("dcgan", {"resolution": 2048}, "1024"),
        ("cnn32", {"resolution": 64}, "model.resolution=64"),
        ("resnet", {"resolution": 64}, "dcgan, cnn32, r3gan"),
        ("dcgan", {"resolution": 64, "width": 0}, "model.width=0"),
        ("dcgan", {"resolution": 64, "pack": 0}, "model.pack=0"),
        ("dcgan", {"resolution": 64, "z_dim": 1.5}, "model.z_dim=1.5"),
        ("dcgan", {"resolution": True}, "model.resolution=True"),
    ],
)
def test_bad_config_raises_config_error(arch, kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_models(arch, **kwargs)


def test_archs_constant():
    assert ARCHS == ("dcgan", "cnn32", "r3gan")


# --------------------------------------------------------------------------------------------
# Initialisation and determinism
# --------------------------------------------------------------------------------------------


def test_init_statistics():
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=64, z_dim=128, width=64, spectral_norm=True)
    for m in list(G.modules()) + list(D.modules()):
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and raw_weight(m).numel() > 10_000:
            w = raw_weight(m).detach()
            assert w.std().item() == pytest.approx(0.02, rel=0.05)
            assert abs(w.mean().item()) < 0.002
        if isinstance(m, nn.BatchNorm2d) and m.num_features >= 256:
            assert m.weight.mean().item() == pytest.approx(1.0, abs=0.005)
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.25)
            assert torch.all(m.bias == 0)
    # cnn32: the official weights_init touches convs and BatchNorm only, so Linear layers and conv biases keep
    # PyTorch's defaults: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weight std 1/sqrt(3 fan_in)).
    torch.manual_seed(0)
    G, D = build_models("cnn32", resolution=32, z_dim=128, width=64, d_batch_norm=False)
    assert G.dense.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 128), rel=0.05)
    assert D.to_logit.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 8192), rel=0.05)
    for m in list(G.modules()) + list(D.modules()):
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
            fan_in = m.weight.shape[1] * m.weight[0, 0].numel()  # torch's own rule, ConvT included
            assert 0 < m.bias.abs().max().item() <= 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("arch,R", [("dcgan", 32), ("cnn32", 32)])
def test_same_seed_same_weights(arch, R):
    def build(seed):
        torch.manual_seed(seed)
        return build_models(arch, resolution=R, spectral_norm=True, **TINY)

    (G1, D1), (G2, D2), (G3, _) = build(7), build(7), build(8)
    for a, b in ((G1, G2), (D1, D2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)  # includes spectral norm's u/v buffers
    assert not torch.equal(G1.to_rgb[0].weight, G3.to_rgb[0].weight)


# --------------------------------------------------------------------------------------------
# channels_last and describe
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,pack", [("dcgan", 1), ("dcgan", 2), ("cnn32", 2)])
def test_channels_last_matches_contiguous(arch, pack):
    torch.manual_seed(0)
    G, D = build_models(arch, resolution=32, pack=pack, **TINY)
    G.eval(), D.eval()
    z = torch.randn(4, 8)
    x = G(z)
    c = D(x)
    G_cl = copy.deepcopy(G).to(memory_format=torch.channels_last)
    D_cl = copy.deepcopy(D).to(memory_format=torch.channels_last)
    x_cl = G_cl(z)
    torch.testing.assert_close(x_cl, x)
    torch.testing.assert_close(D_cl(x.contiguous(memory_format=torch.channels_last)), c)


def test_describe_is_one_line_with_both_counts():
    G, D = build_models("dcgan", resolution=64, z_dim=128, width=64)
    s = describe(G, D)
    assert "\n" not in s
    assert "3,806,080" in s and "2,765,568" in s and "dcgan 64x64" in s
