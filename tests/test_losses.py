"""Losses and penalties against independently written formulas.

The reference expressions below are spelled out with explicit log/softplus arithmetic on
purpose: they share no code with rgan_dist.losses, so a wrong sign, a missing /2 or a [B]
against [B, 1] broadcast in the module shows up as a mismatch.

Source: the paper (Jolicoeur-Martineau, "The relativistic discriminator: a key element missing from
standard GAN", ICLR 2019, arXiv:1807.00734) as its official code computes it
(github.com/AlexiaJM/RelativisticGAN, `code/GAN_losses_iter.py`, `--loss_D` 1..8). With r = C(x_real),
f = C(x_fake) raw logits and m = batch mean:

    code  name        D loss                                          G loss
    1     SGAN        BCE(r,1) + BCE(f,0)                             BCE(f,1) (non-saturating)
    2     LSGAN       m((r-1)^2) + m(f^2)  (not halved)               m((f-1)^2)
    3     WGAN-GP     -m(r) + m(f) + GP                               -m(f)
    4     HingeGAN    m(relu(1-r)) + m(relu(1+f))                     -m(f)
    5     RSGAN       BCE(r-f, 1), paired by index                    BCE(f-r, 1)
    6     RaSGAN      [BCE(r-m(f),1) + BCE(f-m(r),0)]/2               [BCE(r-m(f),0) + BCE(f-m(r),1)]/2
    7     RaLSGAN     [m((r-m(f)-1)^2) + m((f-m(r)+1)^2)]/2           [m((r-m(f)+1)^2) + m((f-m(r)-1)^2)]/2
    8     RaHinge     [m(relu(1-(r-m(f)))) + m(relu(1+(f-m(r))))]/2   [m(relu(1+(r-m(f)))) + m(relu(1-(f-m(r))))]/2

GP (`--grad_penalty`): u ~ U(0, 1) per sample, x_hat = u x_r + (1-u) x_f (x_f detached),
lambda m((||grad C(x_hat)||_2 - 1)^2) with the norm over C*H*W, lambda = 10. The paper-era upload had
a sign bug in RaSGAN/RaLSGAN (fake term m(f) - r; the repository's issue #2), fixed a day later: the
fixed form is the one tested. The centred (Rc) forms follow the author's later code
(github.com/AlexiaJM/relativistic-f-divergences, `GAN.py`), keeping the /2 (see rgan_dist/losses.py).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import nn

from rgan_dist import losses
from rgan_dist.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Reference formulas (float64). r, f: flat logits.
# ---------------------------------------------------------------------------------------------


def bce1(x):  # BCE(x, 1) = -log sigmoid(x) = log(1 + exp(-x))
    return torch.log1p(torch.exp(-x)).mean()


def bce0(x):  # BCE(x, 0) = -log(1 - sigmoid(x)) = log(1 + exp(x))
    return torch.log1p(torch.exp(x)).mean()


def relu(x):
    return torch.clamp(x, min=0)


def centre(r, f):
    return (r.mean() + f.mean()) / 2


REFERENCE = {
    # name: (D loss, G loss)
    "sgan": (lambda r, f: bce1(r) + bce0(f), lambda r, f: bce1(f)),
    "sgan-sat": (lambda r, f: bce1(r) + bce0(f), lambda r, f: -bce0(f)),
    "rsgan": (lambda r, f: bce1(r - f), lambda r, f: bce1(f - r)),
    "rpgan": (lambda r, f: bce1(r - f), lambda r, f: bce1(f - r)),
    "rasgan": (
        lambda r, f: (bce1(r - f.mean()) + bce0(f - r.mean())) / 2,
        lambda r, f: (bce0(r - f.mean()) + bce1(f - r.mean())) / 2,
    ),
    "lsgan": (
        lambda r, f: ((r - 1) ** 2).mean() + (f**2).mean(),
        lambda r, f: ((f - 1) ** 2).mean(),
    ),
    "ralsgan": (
        lambda r, f: (((r - f.mean() - 1) ** 2).mean() + ((f - r.mean() + 1) ** 2).mean()) / 2,
        lambda r, f: (((r - f.mean() + 1) ** 2).mean() + ((f - r.mean() - 1) ** 2).mean()) / 2,
    ),
    "hinge": (
        lambda r, f: relu(1 - r).mean() + relu(1 + f).mean(),
        lambda r, f: -f.mean(),
    ),
    "rahinge": (
        lambda r, f: (relu(1 - (r - f.mean())).mean() + relu(1 + (f - r.mean())).mean()) / 2,
        lambda r, f: (relu(1 + (r - f.mean())).mean() + relu(1 - (f - r.mean())).mean()) / 2,
    ),
    "wgan": (lambda r, f: f.mean() - r.mean(), lambda r, f: -f.mean()),
    "rcsgan": (
        lambda r, f: (bce1(r - centre(r, f)) + bce0(f - centre(r, f))) / 2,
        lambda r, f: (bce0(r - centre(r, f)) + bce1(f - centre(r, f))) / 2,
    ),
    "rclsgan": (
        lambda r, f: (((r - centre(r, f) - 1) ** 2).mean() + ((f - centre(r, f) + 1) ** 2).mean()) / 2,
        lambda r, f: (((r - centre(r, f) + 1) ** 2).mean() + ((f - centre(r, f) - 1) ** 2).mean()) / 2,
    ),
    "rchinge": (
        lambda r, f: (relu(1 - (r - centre(r, f))).mean() + relu(1 + (f - centre(r, f))).mean()) / 2,
        lambda r, f: (relu(1 + (r - centre(r, f))).mean() + relu(1 - (f - centre(r, f))).mean()) / 2,
    ),
}

RELATIVISTIC = {"rsgan", "rpgan", "rasgan", "ralsgan", "rahinge", "rcsgan", "rclsgan", "rchinge"}


def test_registry_matches_the_documented_names():
    assert set(losses.LOSSES) == set(REFERENCE)
    assert losses.PENALTIES == ("none", "wgan-gp", "r1", "r2", "r1+r2")
    for name in losses.LOSSES:
        assert losses.needs_real_in_g_step(name) == (name in RELATIVISTIC), name


def _value_and_grads(fn, r, f):
    r = r.detach().clone().requires_grad_(True)
    f = f.detach().clone().requires_grad_(True)
    value = fn(r, f)
    gr, gf = torch.autograd.grad(value, (r, f), allow_unused=True)
    gr = torch.zeros_like(r) if gr is None else gr
    gf = torch.zeros_like(f) if gf is None else gf
    return value.detach(), gr.reshape(-1), gf.reshape(-1)


@pytest.mark.parametrize("shape", [(16,), (16, 1)])
@pytest.mark.parametrize("side", ["d", "g"])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_loss_value_and_gradients_match_reference(name, side, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{side}/{shape}".encode()))
    # Spread wide enough to cross hinge kinks on both sides and to separate the means.
    r = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5)
    f = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 - 0.5)
    module_fn = losses.d_loss if side == "d" else losses.g_loss
    ref_fn = REFERENCE[name][0 if side == "d" else 1]

    got = _value_and_grads(lambda a, b: module_fn(name, a, b), r, f)
    want = _value_and_grads(lambda a, b: ref_fn(a.reshape(-1), b.reshape(-1)), r, f)

    assert got[0].shape == ()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_rpgan_is_rsgan():
    r, f = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    for fn in (losses.d_loss, losses.g_loss):
        assert fn("rpgan", r, f).item() == fn("rsgan", r, f).item()


def test_mixed_shapes_do_not_broadcast_into_a_matrix():
    r, f = torch.randn(8, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    for name in losses.LOSSES:
        for fn in (losses.d_loss, losses.g_loss):
            assert fn(name, r, f).item() == pytest.approx(fn(name, r, f.reshape(-1)).item(), abs=1e-12)


def test_paired_loss_rejects_unequal_batches():
    with pytest.raises(ValueError, match="as many real as fake"):
        losses.d_loss("rsgan", torch.randn(8), torch.randn(6))


def test_average_and_centred_losses_accept_unequal_batches():
    # Ra/Rc compare with batch means, so e.g. a PacGAN fake batch of another size is fine.
    r, f = torch.randn(8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    for name in ("rasgan", "ralsgan", "rahinge", "rcsgan", "rclsgan", "rchinge"):
        assert losses.d_loss(name, r, f).item() == pytest.approx(REFERENCE[name][0](r, f).item())


@pytest.mark.parametrize("side", ["d", "g"])
@pytest.mark.parametrize("name", losses.LOSSES)
def test_global_reference_means_make_rank_shards_add_up_to_the_whole_batch(name, side):
    """Two "ranks" in one process: each computes its loss on half the batch with `means` giving the whole
    batch's m(r), m(f) (what the all-reduce gives every rank). The ranks' average, the quantity whose
    gradient DDP/DeepSpeed produce, then equals the loss on the whole batch, gradients included, for every
    loss. With each half's own means (`local_means`) the Ra/Rc losses become another objective."""
    fn = losses.d_loss if side == "d" else losses.g_loss
    g = torch.Generator().manual_seed(3)
    r = (3 * torch.randn(8, generator=g, dtype=torch.float64)).requires_grad_()
    f = (3 * torch.randn(8, generator=g, dtype=torch.float64)).requires_grad_()
    whole = fn(name, r, f)
    want = torch.autograd.grad(whole, (r, f), materialize_grads=True)  # G of sgan etc. ignores r
    shards = [fn(name, r[i:i + 4], f[i:i + 4], means=lambda _r, _f: (r.mean(), f.mean())) for i in (0, 4)]
    ranks = (shards[0] + shards[1]) / 2
    got = torch.autograd.grad(ranks, (r, f), materialize_grads=True)
    assert ranks.item() == pytest.approx(whole.item(), rel=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    local = sum(fn(name, r[i:i + 4], f[i:i + 4], means=losses.local_means) for i in (0, 4)) / 2
    uses_reference = name in {"rasgan", "ralsgan", "rahinge", "rcsgan", "rclsgan", "rchinge"}
    assert (abs(local.item() - whole.item()) > 1e-3) == uses_reference


def test_g_loss_without_reals_only_for_non_relativistic():
    f = torch.randn(8, dtype=torch.float64)
    for name in losses.LOSSES:
        if name in RELATIVISTIC:
            with pytest.raises(ValueError, match="needs c_real"):
                losses.g_loss(name, None, f)
        else:
            assert losses.g_loss(name, None, f).item() == pytest.approx(REFERENCE[name][1](f, f).item())


def test_half_precision_logits_give_float32_losses():
    r, f = torch.randn(8).bfloat16(), torch.randn(8).bfloat16()
    for name in losses.LOSSES:
        assert losses.d_loss(name, r, f).dtype == torch.float32
        assert losses.g_loss(name, r, f).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_large_logits_stay_finite(name):
    big = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=torch.float32)
    for r, f in ((big, -big), (big, big), (-big, big)):
        for fn in (losses.d_loss, losses.g_loss):
            value, gr, gf = _value_and_grads(lambda a, b, fn=fn: fn(name, a, b), r, f)
            assert torch.isfinite(value), (name, fn.__name__, r, f)
            assert torch.isfinite(gr).all() and torch.isfinite(gf).all(), (name, fn.__name__)


def test_saturated_sgan_reaches_the_exact_log_loss():
    # sigmoid-then-log would give inf here; the logits form gives the exact value 1e4.
    d = losses.d_loss("sgan", torch.tensor([-1e4]), torch.tensor([-1e4]))
    assert d.item() == pytest.approx(1e4)


# ---------------------------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------------------------


class LinearCritic(nn.Module):
    """C(x) = <w, x> per image: its input gradient is w for every image."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


class QuadraticCritic(nn.Module):
    """C(x) = 1/2 sum a*x^2 per image: input gradient a*x, different for every image."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x):
        return 0.5 * (self.a * x * x).flatten(1).sum(1, keepdim=True)  # [B, 1] on purpose


class PackedLinearCritic(nn.Module):
    """PacGAN-style: stacks `pack` consecutive images on channels, one linear score per pack."""

    def __init__(self, w: torch.Tensor, pack: int):
        super().__init__()
        self.w = nn.Parameter(w.clone())  # [pack*C, H, W]
        self.pack = pack

    def forward(self, x):
        b, c, h, w = x.shape
        packed = x.reshape(b // self.pack, self.pack * c, h, w)
        return (packed * self.w).flatten(1).sum(1)


def small_conv_critic(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 1),
    )


def _images(seed: int, n: int = 4, shape=(3, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), torch.randn(n, *shape, generator=gen)


def test_linear_critic_penalty_values_and_second_order_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 8) * 0.2
    norm = w.norm().item()
    x_r, x_f = _images(1)
    weight = 10.0

    critic = LinearCritic(w)
    gp = losses.penalty("wgan-gp", critic, x_r, x_f, weight)
    assert gp.item() == pytest.approx(weight * (norm - 1) ** 2, rel=1e-5)
    # Double backward: d/dw weight*(||w||-1)^2 = 2*weight*(||w||-1)*w/||w||.
    gp.backward()
    torch.testing.assert_close(critic.w.grad, 2 * weight * (norm - 1) * w / norm, rtol=1e-5, atol=1e-6)

    for name, factor in (("r1", 0.5), ("r2", 0.5), ("r1+r2", 1.0)):
        critic = LinearCritic(w)
        value = losses.penalty(name, critic, x_r, x_f, weight)
        assert value.item() == pytest.approx(factor * weight * norm**2, rel=1e-5), name
        value.backward()
        torch.testing.assert_close(critic.w.grad, 2 * factor * weight * w, rtol=1e-5, atol=1e-6)

    none = losses.penalty("none", critic, x_r, x_f, weight)
    assert none.shape == () and none.item() == 0.0


def test_quadratic_critic_uses_the_right_inputs_and_per_image_u():
    a = torch.rand(3, 8, 8, dtype=torch.float64) + 0.5
    critic = QuadraticCritic(a)
    x_r, x_f = (t.double() for t in _images(2))
    weight = 3.0

    def sq(x):  # per-image ||a*x||^2
        return ((a * x) ** 2).flatten(1).sum(1)

    r1 = losses.penalty("r1", critic, x_r, x_f, weight)
    r2 = losses.penalty("r2", critic, x_r, x_f, weight)
    assert r1.item() == pytest.approx(weight / 2 * sq(x_r).mean().item(), rel=1e-6)
    assert r2.item() == pytest.approx(weight / 2 * sq(x_f).mean().item(), rel=1e-6)

    # u is torch.rand(B) from the given generator (documented), one per image.
    u = torch.rand(4, generator=torch.Generator().manual_seed(7), dtype=torch.float32).double()
    x_hat = u.view(-1, 1, 1, 1) * x_r + (1 - u.view(-1, 1, 1, 1)) * x_f
    want = weight * ((sq(x_hat).sqrt() - 1) ** 2).mean().item()
    gp = losses.penalty("wgan-gp", critic, x_r, x_f, weight, generator=torch.Generator().manual_seed(7))
    assert gp.item() == pytest.approx(want, rel=1e-6)
    gp_again = losses.penalty("wgan-gp", critic, x_r, x_f, weight, generator=torch.Generator().manual_seed(7))
    assert gp_again.item() == gp.item()
    gp_other = losses.penalty("wgan-gp", critic, x_r, x_f, weight, generator=torch.Generator().manual_seed(8))
    assert gp_other.item() != gp.item()


def test_penalty_does_not_backprop_into_the_images():
    critic = small_conv_critic()
    x_r, x_f = _images(3)
    x_f = x_f.requires_grad_(True)  # as if fresh from G
    losses.penalty("r1+r2", critic, x_r, x_f, 1.0).backward()
    losses.penalty("wgan-gp", critic, x_r, x_f, 1.0).backward()
    assert x_f.grad is None


@pytest.mark.parametrize("name", ["wgan-gp", "r1", "r2", "r1+r2"])
def test_conv_critic_double_backward_reaches_every_parameter(name):
    critic = small_conv_critic()
    x_r, x_f = _images(4)
    d = losses.d_loss("rsgan", critic(x_r), critic(x_f))
    total = d + losses.penalty(name, critic, x_r, x_f, 10.0, generator=torch.Generator().manual_seed(0))
    total.backward()  # one ordinary backward, as the strategies do
    for pname, p in critic.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # The penalty alone must move the weights too (second-order path, not just the D loss).
    critic.zero_grad()
    losses.penalty(name, critic, x_r, x_f, 10.0, generator=torch.Generator().manual_seed(0)).backward()
    assert critic[0].weight.grad.abs().sum() > 0 and torch.isfinite(critic[0].weight.grad).all()


def test_r1_plus_r2_is_the_sum_of_its_parts():
    critic = small_conv_critic()
    x_r, x_f = _images(5)
    r1 = losses.penalty("r1", critic, x_r, x_f, 2.5)
    r2 = losses.penalty("r2", critic, x_r, x_f, 2.5)
    both = losses.penalty("r1+r2", critic, x_r, x_f, 2.5)
    assert r1.item() != pytest.approx(r2.item())  # a nonlinear critic tells reals from fakes
    assert both.item() == pytest.approx(r1.item() + r2.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["wgan-gp", "r1", "r2", "r1+r2"])
def test_bf16_autocast_is_finite_and_close_to_fp32(name):
    critic = small_conv_critic()
    x_r, x_f = _images(6)
    ref = losses.penalty(name, critic, x_r, x_f, 10.0, generator=torch.Generator().manual_seed(1))
    ref.backward()
    ref_grads = {n: p.grad for n, p in critic.named_parameters()}
    critic.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses.penalty(name, critic, x_r, x_f, 10.0, generator=torch.Generator().manual_seed(1))
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref.item(), rel=5e-2)
    got.backward()
    # The last bias cannot change an input gradient, so it gets no grad in either precision.
    for n, p in critic.named_parameters():
        assert (p.grad is None) == (ref_grads[n] is None), n
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
            # Biases before a piecewise-linear activation get an exactly zero penalty gradient.
            err = (p.grad - ref_grads[n]).norm().item()
            assert err <= 0.1 * ref_grads[n].norm().item() + 1e-6, (n, err)


def test_packing_critic_penalises_each_input_image():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 4) * 0.3  # pack=2 of 3-channel images
    n1, n2 = w[:3].norm().item(), w[3:].norm().item()
    x_r, x_f = _images(7, n=6, shape=(3, 4, 4))
    critic = PackedLinearCritic(w, pack=2)
    assert critic(x_r).shape == (3,)
    # Images at even positions get gradient w[:3], odd ones w[3:]; means run over the 6 images.
    r1 = losses.penalty("r1", critic, x_r, x_f, 4.0)
    assert r1.item() == pytest.approx(4.0 / 2 * (n1**2 + n2**2) / 2, rel=1e-5)
    gp = losses.penalty("wgan-gp", critic, x_r, x_f, 4.0)
    assert gp.item() == pytest.approx(4.0 * ((n1 - 1) ** 2 + (n2 - 1) ** 2) / 2, rel=1e-5)


class TinyHalfCritic(nn.Module):
    """Runs in fp16 and has input gradients of 1e-8: below fp16's smallest subnormal (6e-8)."""

    def forward(self, x):
        return ((x.half() * 1e-4).sum((1, 2, 3)) * 1e-4).float()


def test_grad_scale_rescues_fp16_gradients_from_underflow():
    x_r, x_f = _images(8, n=2, shape=(1, 2, 2))
    want = 1.0 / 2 * 4 * (1e-8) ** 2  # weight/2 * ||g||^2 with g = 1e-8 on 4 pixels
    unscaled = losses.penalty("r1", TinyHalfCritic(), x_r, x_f, 1.0)
    assert unscaled.item() == 0.0  # the failure grad_scale exists for
    scaled = losses.penalty("r1", TinyHalfCritic(), x_r, x_f, 1.0, grad_scale=2.0**14)
    assert scaled.item() == pytest.approx(want, rel=2e-2)


def test_grad_scale_leaves_fp32_penalties_unchanged():
    critic = small_conv_critic()
    x_r, x_f = _images(9)
    plain = losses.penalty("r1+r2", critic, x_r, x_f, 10.0)
    scaled = losses.penalty("r1+r2", critic, x_r, x_f, 10.0, grad_scale=1024.0)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: losses.d_loss("ragan", torch.zeros(2), torch.zeros(2)),
        lambda: losses.g_loss("ragan", torch.zeros(2), torch.zeros(2)),
        lambda: losses.needs_real_in_g_step("ragan"),
    ],
)
def test_unknown_loss_lists_the_allowed_names(call):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "'ragan'" in message and "loss.name" in message
    for name in losses.LOSSES:
        assert name in message


def test_unknown_penalty_lists_the_allowed_names():
    with pytest.raises(ConfigError) as info:
        losses.penalty("gp", small_conv_critic(), *_images(0), 10.0)
    message = str(info.value)
    assert "'gp'" in message and "loss.penalty" in message
    for name in losses.PENALTIES:
        assert name in message
    assert "\n" not in message


def test_negative_penalty_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="penalty_weight"):
        losses.penalty("r1", small_conv_critic(), *_images(0), -1.0)


def test_math_of_the_reference_helpers():
    # Guard the guards: the hand-written BCE helpers agree with the textbook definitions.
    x = torch.tensor([0.3], dtype=torch.float64)
    s = 1 / (1 + math.exp(-0.3))
    assert bce1(x).item() == pytest.approx(-math.log(s))
    assert bce0(x).item() == pytest.approx(-math.log(1 - s))


def test_config_names_are_the_registries():
    """config spells the names out (it must not import torch); they must be exactly the registries."""
    from rgan_dist.config import LOSS_NAMES, PENALTY_NAMES

    assert LOSS_NAMES == losses.LOSSES
    assert PENALTY_NAMES == losses.PENALTIES


@pytest.mark.parametrize("concatenated", [False, True])
@pytest.mark.parametrize("name", ["r1", "r2", "r1+r2"])
def test_penalty_from_the_d_loss_forward_equals_its_own_forward(name, concatenated):
    """The D step differentiates its own forward (inputs marked requires_grad) instead of a third forward:
    same value, same gradients w.r.t. the critic's parameters, whether real and fake went through one
    concatenated forward or two."""
    x_r, x_f = _images(7)
    critic = small_conv_critic()
    ref = losses.penalty(name, critic, x_r, x_f, 3.0)
    ref.backward()
    ref_grads = [p.grad for p in critic.parameters()]  # None where R1/R2 does not depend on it (last bias)
    critic.zero_grad(set_to_none=True)
    want_r, want_f = losses.penalty_inputs(name)
    r, f = x_r.clone().requires_grad_(want_r), x_f.clone().requires_grad_(want_f)
    if concatenated:
        c = critic(torch.cat([r, f]))
        c_r, c_f = c[: len(r)], c[len(r):]
    else:
        c_r, c_f = critic(r), critic(f)
    pen = losses.penalty_from_forward(name, r, f, c_r, c_f, 3.0)
    torch.testing.assert_close(pen, ref, rtol=1e-6, atol=1e-7)
    pen.backward()
    for p, g in zip(critic.parameters(), ref_grads, strict=True):
        assert (p.grad is None) == (g is None)
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_penalties_that_need_a_forward_of_their_own_say_so():
    assert losses.penalty_inputs("wgan-gp") is None and losses.penalty_inputs("none") is None
    x_r, x_f = _images(8)
    with pytest.raises(ValueError, match="forward of its own"):
        losses.penalty_from_forward("wgan-gp", x_r, x_f, x_r.sum((1, 2, 3)), x_f.sum((1, 2, 3)), 1.0)
