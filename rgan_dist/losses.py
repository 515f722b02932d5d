"""Every GAN loss and gradient penalty rgan-dist knows, in one file, readable top to bottom.

Why one file: relativistic losses make the generator step depend on the critic's output on
*real* images, which changes what the training loop must compute. Keeping every loss decision
(formula, scaling, whether the G step needs reals) here means the loop never branches on a
loss name, and a reviewer can check the whole family in one sitting against the paper
(Jolicoeur-Martineau, "The relativistic discriminator: a key element missing from standard GAN",
ICLR 2019, arXiv:1807.00734) and its official code (github.com/AlexiaJM/RelativisticGAN,
``code/GAN_losses_iter.py``, ``--loss_D`` 1..8; tests/test_losses.py lists that table).

Conventions (r = C(x_real), f = C(x_fake), raw logits; m = batch mean, see "Batch statistics";
BCE(x, t) = ``binary_cross_entropy_with_logits``, mean-reduced):

- Non-relativistic losses follow the official RelativisticGAN code (``GAN_losses_iter.py``):
  LSGAN is *not* halved; the G losses of SGAN/LSGAN/hinge/WGAN ignore ``r``.
- Relativistic *average* (Ra) losses carry the ``/2`` of the official code: D and G are the
  mean of the real-side and fake-side terms. The paper-era sign bug (issue #2) is not
  reproduced: the fake term is ``f - m(r)``.
- ``rsgan`` (alias ``rpgan``, the R3GAN name) pairs reals and fakes by index.
- Relativistic *centred* (Rc) losses use c = (m(r) + m(f)) / 2, with the D and G forms of the
  author's later code (AlexiaJM/relativistic-f-divergences ``GAN.py``, loss_D 21-23):
  D pushes reals above c and fakes below it, G the reverse. That repository drops the ``/2``
  on Ra *and* Rc alike; we keep the ``/2`` on both so that Ra and Rc of one family share
  a scale here too. (A constant factor only rescales the gradient, i.e. the learning rate;
  Adam is almost invariant to it.)

Batch statistics across ranks. Ra and Rc losses compare each sample with a *reference statistic*,
m(r), m(f) or c, the mean over the batch of the other side's logits. Under DDP or DeepSpeed each rank
sees B of the N*B samples; the loss functions get that statistic from a ``means`` callable (default
`local_means`, this process's batch), which the strategy replaces with an all-reduce *with gradient*
(`engine.strategy.DistributedStrategy.batch_means`, ``loss.batch_stats=global``), so that N ranks x B optimise the same
objective as one process x N*B. Why only the reference statistic needs it, and not the outer mean of the
per-sample loss terms (the mean of the BCEs, ``_m``): with L = mean over all N*B samples of l_i, and the
rank-k mean L_k over its B samples, L = (1/N) sum_k L_k (B is the same on every rank); DDP and DeepSpeed
average the ranks' gradients, i.e. compute (1/N) sum_k grad L_k = grad L already. The reference statistic is different:
it sits *inside* every l_i, so a per-rank m makes each l_i a different function, which no averaging of
gradients can repair. With the all-reduce, m is the global mean on every rank, and its backward (an
all-reduce of the upstream gradient, summed) hands each rank d(sum_k L_k)/dm, so that the
(1/N)-averaged gradients again equal grad L, the path through m included.

Logits may have shape [B] or [B, 1]; they are flattened first so that a [B] against a [B, 1]
never broadcasts into a [B, B] matrix. Half-precision logits are promoted to float32 before
any arithmetic: the losses are cheap, and squaring or averaging in bf16 loses digits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rgan_dist.errors import ConfigError

__all__ = [
    "LOSSES",
    "PENALTIES",
    "BatchMeans",
    "check_loss_name",
    "check_penalty_name",
    "d_loss",
    "g_loss",
    "local_means",
    "needs_real_in_g_step",
    "penalty",
    "penalty_from_forward",
    "penalty_inputs",
]


# --------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------


def _bce(logits: Tensor, target: float) -> Tensor:
    """Mean BCE against a constant label, through the fused log-sum-exp form (stable at |x|=1e4)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _m(x: Tensor) -> Tensor:
    """The mean of per-sample loss terms over this process's batch (no all-reduce: see the docstring)."""
    return x.mean()


BatchMeans = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def local_means(r: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """The reference statistics (m(r), m(f)) over this process's batch: one process, or
    ``loss.batch_stats=local``. Strategies supply the global version (same signature)."""
    return r.mean(), f.mean()


def _centre(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    """The Rc reference point: the midpoint of the real and fake mean logits."""
    m_r, m_f = means(r, f)
    return (m_r + m_f) / 2


def _prepare(c: Tensor) -> Tensor:
    c = c.reshape(-1)
    if c.dtype in (torch.float16, torch.bfloat16):
        c = c.float()
    return c


def _require_paired(r: Tensor, f: Tensor) -> None:
    if r.numel() != f.numel():
        raise ValueError(
            f"paired relativistic loss needs as many real as fake logits, got {r.numel()} real "
            f"and {f.numel()} fake"
        )


# --------------------------------------------------------------------------------------------
# The losses: one D and one G function per variant. r, f are flat float logits.
# --------------------------------------------------------------------------------------------

# SGAN (Goodfellow et al.): D classifies; G non-saturating, or saturating (the minimax form).
def _sgan_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    return _bce(r, 1.0) + _bce(f, 0.0)


def _sgan_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    return _bce(f, 1.0)


def _sgan_sat_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    # minimise log(1 - sigmoid(f)) = -BCE(f, 0): kept to show why the non-saturating G exists.
    return -_bce(f, 0.0)


# LSGAN (a=0, b=c=1), not halved, as in the official code.
def _lsgan_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    return _m((r - 1) ** 2) + _m(f**2)


def _lsgan_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    return _m((f - 1) ** 2)


# Hinge (Miyato et al. / SAGAN form).
def _hinge_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    return _m(F.relu(1 - r)) + _m(F.relu(1 + f))


def _hinge_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    return -_m(f)


# WGAN critic loss; the Lipschitz constraint comes from the separate `wgan-gp` penalty.
def _wgan_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    return _m(f) - _m(r)


def _wgan_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    return -_m(f)


# RSGAN / RpGAN: pairs by index; G is D with the roles swapped.
def _rsgan_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    _require_paired(r, f)
    return _bce(r - f, 1.0)


def _rsgan_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    _require_paired(r, f)
    return _bce(f - r, 1.0)


# Relativistic average: each sample is compared with the other side's batch mean; /2.
def _rasgan_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    m_r, m_f = means(r, f)
    return (_bce(r - m_f, 1.0) + _bce(f - m_r, 0.0)) / 2


def _rasgan_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    m_r, m_f = means(r, f)
    return (_bce(r - m_f, 0.0) + _bce(f - m_r, 1.0)) / 2


def _ralsgan_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    m_r, m_f = means(r, f)
    return (_m((r - m_f - 1) ** 2) + _m((f - m_r + 1) ** 2)) / 2


def _ralsgan_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    m_r, m_f = means(r, f)
    return (_m((r - m_f + 1) ** 2) + _m((f - m_r - 1) ** 2)) / 2


def _rahinge_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    m_r, m_f = means(r, f)
    return (_m(F.relu(1 - (r - m_f))) + _m(F.relu(1 + (f - m_r)))) / 2


def _rahinge_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    m_r, m_f = means(r, f)
    return (_m(F.relu(1 + (r - m_f))) + _m(F.relu(1 - (f - m_r)))) / 2


# Relativistic centred: both sides compared with c = (m(r) + m(f)) / 2; /2 as for Ra.
def _rcsgan_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    c = _centre(r, f, means)
    return (_bce(r - c, 1.0) + _bce(f - c, 0.0)) / 2


def _rcsgan_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    c = _centre(r, f, means)
    return (_bce(r - c, 0.0) + _bce(f - c, 1.0)) / 2


def _rclsgan_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    c = _centre(r, f, means)
    return (_m((r - c - 1) ** 2) + _m((f - c + 1) ** 2)) / 2


def _rclsgan_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    c = _centre(r, f, means)
    return (_m((r - c + 1) ** 2) + _m((f - c - 1) ** 2)) / 2


def _rchinge_d(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    c = _centre(r, f, means)
    return (_m(F.relu(1 - (r - c))) + _m(F.relu(1 + (f - c)))) / 2


def _rchinge_g(r: Tensor, f: Tensor, means: BatchMeans) -> Tensor:
    c = _centre(r, f, means)
    return (_m(F.relu(1 + (r - c))) + _m(F.relu(1 - (f - c)))) / 2


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_LossFn = Callable[[Tensor, Tensor, BatchMeans], Tensor]


@dataclass(frozen=True)
class _Loss:
    d: _LossFn
    g: _LossFn
    # True when G's loss depends on C(x_real): the G step must then run D on a real batch.
    relativistic: bool


_RSGAN = _Loss(_rsgan_d, _rsgan_g, relativistic=True)

_REGISTRY: dict[str, _Loss] = {
    "sgan": _Loss(_sgan_d, _sgan_g, relativistic=False),
    "sgan-sat": _Loss(_sgan_d, _sgan_sat_g, relativistic=False),
    "rsgan": _RSGAN,
    "rpgan": _RSGAN,
    "rasgan": _Loss(_rasgan_d, _rasgan_g, relativistic=True),
    "lsgan": _Loss(_lsgan_d, _lsgan_g, relativistic=False),
    "ralsgan": _Loss(_ralsgan_d, _ralsgan_g, relativistic=True),
    "hinge": _Loss(_hinge_d, _hinge_g, relativistic=False),
    "rahinge": _Loss(_rahinge_d, _rahinge_g, relativistic=True),
    "wgan": _Loss(_wgan_d, _wgan_g, relativistic=False),
    "rcsgan": _Loss(_rcsgan_d, _rcsgan_g, relativistic=True),
    "rclsgan": _Loss(_rclsgan_d, _rclsgan_g, relativistic=True),
    "rchinge": _Loss(_rchinge_d, _rchinge_g, relativistic=True),
}

LOSSES: tuple[str, ...] = tuple(_REGISTRY)


def check_loss_name(name: str) -> str:
    """Return ``name`` if it is a known loss; else raise the one-line ConfigError config code reuses."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown loss {name!r} (loss.name); allowed: {', '.join(LOSSES)}")
    return name


def needs_real_in_g_step(name: str) -> bool:
    """Whether the generator loss reads C(x_real), so the G step must forward D on a real batch."""
    return _REGISTRY[check_loss_name(name)].relativistic


def d_loss(name: str, c_real: Tensor, c_fake: Tensor, *, means: BatchMeans = local_means) -> Tensor:
    """Discriminator loss (scalar) from raw critic logits of shape [B] or [B, 1].

    ``means`` computes the Ra/Rc reference statistics (m(r), m(f)); the training loop passes its
    strategy's, which is global across ranks unless ``loss.batch_stats=local``.
    """
    loss = _REGISTRY[check_loss_name(name)]
    return loss.d(_prepare(c_real), _prepare(c_fake), means)


def g_loss(name: str, c_real: Tensor | None, c_fake: Tensor, *, means: BatchMeans = local_means) -> Tensor:
    """Generator loss (scalar) from raw critic logits of shape [B] or [B, 1].

    ``c_real`` may be None for losses where ``needs_real_in_g_step`` is False, so that the
    loop need not spend a D forward on reals it would throw away. ``means`` as for `d_loss`.
    """
    loss = _REGISTRY[check_loss_name(name)]
    f = _prepare(c_fake)
    if c_real is None:
        if loss.relativistic:
            raise ValueError(f"loss {name!r} is relativistic: its generator loss needs c_real")
        r = f.new_empty(0)
    else:
        r = _prepare(c_real)
    return loss.g(r, f, means)


# --------------------------------------------------------------------------------------------
# Gradient penalties
#
# All of them differentiate the critic w.r.t. its *input* with create_graph=True and return a
# tensor still attached to the critic's parameters, so the caller adds it to the D loss and
# calls one ordinary backward(): DeepSpeed allows a single backward per step and DDP must
# never see backward(create_graph=True).
#
# Precision: the critic output is summed in float32 before autograd.grad and the gradient is
# promoted to float32 before its norm, so a bf16/fp16 autocast critic yields an fp32 penalty.
# Under the fp16 GradScaler pass its current scale as ``grad_scale``: the summed output is
# multiplied by it before autograd.grad and the input gradient divided by it afterwards (the
# recipe of PyTorch's AMP notes), so small input gradients survive fp16's range instead of
# flushing to zero. An overflow then shows up as inf in the penalty, hence in D's grads, and
# the scaler skips that step as it would for any other overflow. Note that every critic
# output receives the full scale as its upstream gradient, so a scale above fp16's maximum
# (65504; GradScaler starts at 65536) overflows once and the scaler backs off by itself.
#
# Packing (PacGAN): the critic may return fewer rows than it was given (pack images per critic
# sample, output [B/pack]). Differentiating the summed output still yields one gradient per
# *input image*, and every penalty here is defined per input image: norms run over each image's
# non-batch dims and means over the B images. Consequences, stated plainly: R1/R2 equal 1/pack
# times the "per packed sample" version (a packed sample's squared norm is the sum of its
# images'); for wgan-gp each image is pushed towards unit gradient norm on its own, and each
# image gets its own interpolation weight u.
#
# Caveat: a critic with train-mode BatchNorm couples the samples of a batch, so a "per-image
# gradient" also carries cross-image terms (as it did in the official code, whose DCGAN critic
# kept BatchNorm under --grad_penalty); Gulrajani et al. advise a critic without it.
# --------------------------------------------------------------------------------------------

_Critic = Callable[[Tensor], Tensor]


def _grads_at(outputs: list[Tensor], inputs: list[Tensor], grad_scale: float | Tensor) -> list[Tensor]:
    """d(sum of every output)/d(each input), flattened to [B, numel/B], float32, graph kept.

    One autograd.grad for all pairs: when real and fake went through one concatenated forward, both
    input gradients come out of one double-backward graph."""
    out = sum(o.float().sum() for o in outputs)
    grads = torch.autograd.grad(out * grad_scale, inputs, create_graph=True)
    return [g.float().flatten(1) / grad_scale for g in grads]


def _input_grads(critic: _Critic, x: Tensor, grad_scale: float | Tensor) -> Tensor:
    """dC/dx for every input image, flattened to [B, numel/B], float32, graph kept."""
    x = x.detach().requires_grad_(True)
    return _grads_at([critic(x)], [x], grad_scale)[0]


def _sq_norms(grads: Tensor) -> Tensor:
    return grads.pow(2).sum(dim=1)


def _interpolate(x_real: Tensor, x_fake: Tensor, generator: torch.Generator | None) -> Tensor:
    """x_hat = u*x_r + (1-u)*x_f with u ~ U[0, 1] per image, u drawn as ``torch.rand(B)``.

    u is drawn on the generator's device (CPU when a CPU generator drives CUDA data, so a seed
    reproduces the same u on any device) and then moved next to the images.
    """
    if x_real.shape != x_fake.shape:
        raise ValueError(f"wgan-gp needs real and fake batches of one shape, got "
                         f"{tuple(x_real.shape)} and {tuple(x_fake.shape)}")
    draw_device = generator.device if generator is not None else x_real.device
    u = torch.rand(x_real.shape[0], generator=generator, device=draw_device, dtype=torch.float32)
    u = u.to(device=x_real.device, dtype=x_real.dtype).view(-1, *([1] * (x_real.dim() - 1)))
    return u * x_real.detach() + (1 - u) * x_fake.detach()


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), device=x.device, dtype=torch.float32)


def _wgan_gp(critic: _Critic, x_real: Tensor, x_fake: Tensor, weight: float,
             generator: torch.Generator | None, grad_scale: float | Tensor) -> Tensor:
    # One-centred, on interpolates (Gulrajani et al. 2017), as in the official code.
    # vector_norm's derivative is 0 (not NaN) at a zero gradient, so no epsilon is needed.
    grads = _input_grads(critic, _interpolate(x_real, x_fake, generator), grad_scale)
    return weight * ((torch.linalg.vector_norm(grads, dim=1) - 1) ** 2).mean()


def _r1(critic: _Critic, x_real: Tensor, x_fake: Tensor, weight: float,
        generator: torch.Generator | None, grad_scale: float | Tensor) -> Tensor:
    # Zero-centred on reals, gamma/2 * E||grad||^2 (Mescheder et al. 2018).
    return weight / 2 * _sq_norms(_input_grads(critic, x_real, grad_scale)).mean()


def _r2(critic: _Critic, x_real: Tensor, x_fake: Tensor, weight: float,
        generator: torch.Generator | None, grad_scale: float | Tensor) -> Tensor:
    # Zero-centred on (detached) fakes, same convention as R1.
    return weight / 2 * _sq_norms(_input_grads(critic, x_fake, grad_scale)).mean()


def _r1_r2(critic: _Critic, x_real: Tensor, x_fake: Tensor, weight: float,
           generator: torch.Generator | None, grad_scale: float | Tensor) -> Tensor:
    # R3GAN's pair: both terms, one weight.
    return (_r1(critic, x_real, x_fake, weight, generator, grad_scale)
            + _r2(critic, x_real, x_fake, weight, generator, grad_scale))


def _none(critic: _Critic, x_real: Tensor, x_fake: Tensor, weight: float,
          generator: torch.Generator | None, grad_scale: float | Tensor) -> Tensor:
    return _zero(x_real)


_PENALTIES: dict[str, Callable[..., Tensor]] = {
    "none": _none,
    "wgan-gp": _wgan_gp,
    "r1": _r1,
    "r2": _r2,
    "r1+r2": _r1_r2,
}

PENALTIES: tuple[str, ...] = tuple(_PENALTIES)


def check_penalty_name(name: str) -> str:
    """Return ``name`` if it is a known penalty; else raise a one-line ConfigError."""
    if name not in _PENALTIES:
        raise ConfigError(f"unknown penalty {name!r} (loss.penalty); allowed: {', '.join(PENALTIES)}")
    return name


# R1/R2 are zero-centred on the very images the D loss already judges, so the D step can differentiate its
# own forward instead of running a third one: the loop marks those inputs `requires_grad_` (which sides:
# `penalty_inputs`) and hands the logits to `penalty_from_forward`. Same maths as `penalty`: the gradient
# of C at x does not depend on which forward computed C(x), as long as D treats images independently or
# the forward saw the same batch (BatchNorm: the loop keeps real and fake forwards apart).
_SIDES: dict[str, tuple[bool, bool]] = {"r1": (True, False), "r2": (False, True), "r1+r2": (True, True)}


def _check_grad_scale(grad_scale: float | Tensor) -> None:
    # A tensor (fp16: the scaler's scale, on the device) is not checked: reading it would sync the GPU.
    if not isinstance(grad_scale, Tensor) and not grad_scale > 0:
        raise ValueError(f"grad_scale must be positive, got {grad_scale}")


def penalty_inputs(name: str) -> tuple[bool, bool] | None:
    """Which D inputs (real, fake) penalty ``name`` differentiates at, when it can be taken from the D loss's
    own forward (`penalty_from_forward`); None when it needs a forward of its own (wgan-gp's interpolates)
    or there is no penalty."""
    return _SIDES.get(check_penalty_name(name))


def penalty_from_forward(
    name: str,
    x_real: Tensor,
    x_fake: Tensor,
    c_real: Tensor,
    c_fake: Tensor,
    weight: float,
    *,
    grad_scale: float | Tensor = 1.0,
) -> Tensor:
    """R1, R2 or R1+R2 (scalar, float32) from the D loss's forward: ``c_real = D(x_real)``, ``c_fake = D(x_fake)``
    (or slices of one forward on their concatenation), where the sides `penalty_inputs` names had
    ``requires_grad`` set before that forward. Equal to `penalty` on the same images and critic."""
    sides = penalty_inputs(name)
    if sides is None:
        raise ValueError(f"penalty {name!r} needs a forward of its own: use losses.penalty")
    if weight < 0:
        raise ConfigError(f"penalty weight must be >= 0 (loss.penalty_weight), got {weight}")
    _check_grad_scale(grad_scale)
    pairs = [(c, x) for (c, x), on in zip(((c_real, x_real), (c_fake, x_fake)), sides, strict=True) if on]
    grads = _grads_at([c for c, _ in pairs], [x for _, x in pairs], grad_scale)
    return sum(weight / 2 * _sq_norms(g).mean() for g in grads)


def penalty(
    name: str,
    critic: _Critic,
    x_real: Tensor,
    x_fake: Tensor,
    weight: float,
    *,
    generator: torch.Generator | None = None,
    grad_scale: float | Tensor = 1.0,
) -> Tensor:
    """Gradient penalty ``name`` (scalar, float32), attached to the critic's parameters.

    ``critic`` should be the raw module (not a DDP/DeepSpeed wrapper, see DESIGN.md).
    ``generator`` drives wgan-gp's interpolation weights; ``grad_scale`` is the fp16
    GradScaler's current scale (1.0 otherwise). See the section comment above for the
    precision and PacGAN conventions.
    """
    fn = _PENALTIES[check_penalty_name(name)]
    if weight < 0:
        raise ConfigError(f"penalty weight must be >= 0 (loss.penalty_weight), got {weight}")
    _check_grad_scale(grad_scale)
    return fn(critic, x_real, x_fake, weight, generator, grad_scale)
