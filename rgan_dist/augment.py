"""Differentiable augmentation of every image D sees (DiffAugment, Zhao et al. 2020), each op applied per
sample with probability p (ADA, Karras et al. 2020), and ADA's adaptive p.

Why augment D's inputs, fakes included, and differentiably: with little data D memorises the reals; showing
it transformed reals only would teach G to produce the transforms. Transforming reals and fakes alike, in the
D and the G step, with gradients flowing through the transform to G, leaves the distribution G must match
unchanged as long as every op is applied with p < 1 (ADA's "non-leaking" condition) or is invertible in
distribution (DiffAugment).

The ops, in the order they run whatever order `augment.policy` lists them (ADA's pipeline order):
- `flip`: mirror left-right.
- `rot90`: rotate by k * 90 degrees, k uniform in {0, 1, 2, 3} (square images).
- `translation`: integer shift by up to 1/8 of the side in x and y, zero padding (DiffAugment).
- `color`: brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5) (DiffAugment's ranges on
  [-1, 1] images), each of the three gated on its own.
- `cutout`: a square of half the side set to 0 (DiffAugment), centred anywhere in the image.
Each op is applied to a sample with probability p, independently per sample and per op; a sample an op skips
is returned bit for bit (`torch.where`, not a blend), so p = 0 is the identity.

Randomness, and what "the same on every rank" means. The parameters are drawn by `Augment.sample` (outside
any compiled region) from the augmenter's own `torch.Generator`, seeded from `train.seed` alone, so its state
is identical on every rank at every step. Each call draws the parameters of the *global* batch (batch x world
size samples) and a rank keeps the rows of its own samples (rank r: rows r*B..(r+1)*B-1). So sample i of the
global batch gets the same transform whatever the number of ranks: 2 ranks x B are augmented exactly as one
process's 2B, which is what makes "N ranks == one process on the global batch" hold with augmentation on, and
the generator's state in any rank's checkpoint is every rank's. The cost is drawing a few floats per global
sample, not per local one.

Adaptive p (ADA): D's outputs on reals are accumulated on the device (`observe`, no host read) over a window
of `augment.adjust_every` steps; at the window's end (`adjust`) the sums are reduced over ranks, one host read,
r_t = E[sign(.)] over every rank's images, and p moves by sign(r_t - target) * images_in_window / speed_images,
clamped to [0, p_max] (ADA: adjust = sign * batch * interval / (ada_kimg * 1000)). Every rank computes the
same p from the same reduced sums, so p never differs between ranks. For relativistic losses D's logits have no
absolute zero (adding a constant to every logit changes no loss), so the engine observes c_real - c_fake (R3GAN
logs the same sign as "signs/real"); for the others D(real) as ADA does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from rgan_dist.config import AUGMENT_OPS, Config  # AUGMENT_OPS: the op names, in the order they run

TRANSLATION_RATIO = 1 / 8  # DiffAugment's translation: up to 1/8 of the side
CUTOUT_RATIO = 1 / 2  # DiffAugment's cutout: a square of half the side
AUGMENT_SEED_OFFSET = 0xA06  # the augmentation stream: train.seed * 7919 + this, the same on every rank

Params = dict[str, torch.Tensor]  # one batch's drawn parameters: `sample`'s output, `apply`'s input
# (parameter name, number of uniforms per sample) each op draws after its own Bernoulli(p) mask(s)
_DRAWS: dict[str, tuple[tuple[str, int], ...]] = {
    "flip": (("flip", 0),),
    "rot90": (("rot90", 1),),
    "translation": (("translation", 2),),
    "color": (("brightness", 1), ("saturation", 1), ("contrast", 1)),
    "cutout": (("cutout", 2),),
}


def check_policy(policy: Sequence[str]) -> tuple[str, ...]:
    """`policy` in pipeline order; ValueError naming an unknown op."""
    bad = [op for op in policy if op not in AUGMENT_OPS]
    if bad:
        raise ValueError(f"unknown augmentation {bad[0]!r}; choose from {', '.join(AUGMENT_OPS)}")
    return tuple(op for op in AUGMENT_OPS if op in policy)


def draw(policy: Sequence[str], n: int, p: float, generator: torch.Generator,
         device: torch.device | str = "cpu") -> Params:
    """The parameters of `n` samples: per parameter a Bernoulli(p) mask `<name>` ([n] bool) and, where the op
    has any, uniforms `<name>_u` ([n] or [n, 2] in [0, 1)). A fixed number of draws per op and sample, so the
    stream advances the same way whatever p is."""
    out: Params = {}
    for op in check_policy(policy):
        for name, width in _DRAWS[op]:
            out[name] = torch.rand(n, generator=generator, device=device) < p
            if width:
                shape = (n,) if width == 1 else (n, width)
                out[f"{name}_u"] = torch.rand(shape, generator=generator, device=device)
    return out


def cat_params(*parts: Params) -> Params:
    """Parameters of concatenated batches (D's one forward on [real; fake])."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def apply(x: torch.Tensor, params: Params | None) -> torch.Tensor:
    """`x` ([N, C, H, W] in [-1, 1]) augmented with `params` (from `draw`; None: `x` itself). Differentiable
    w.r.t. `x`; no random draws, so it can sit inside a compiled step."""
    if not params:
        return x
    for name, op in _OPS:
        if name in params:
            x = op(x, params)
    return x


def _gate(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` for the samples whose `mask` is set, `old` (bit for bit) for the others."""
    return torch.where(mask.view(-1, 1, 1, 1), new, old)


def _flip(x: torch.Tensor, prm: Params) -> torch.Tensor:
    return _gate(prm["flip"], x.flip(3), x)


def _rot90(x: torch.Tensor, prm: Params) -> torch.Tensor:
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"rot90 needs square images, got {x.shape[2]}x{x.shape[3]}")
    k = (prm["rot90_u"] * 4).long().clamp_(max=3)
    out = x
    for turns in (1, 2, 3):
        out = _gate(prm["rot90"] & (k == turns), x.rot90(turns, dims=(2, 3)), out)
    return out


def _shift_index(size: int, u: torch.Tensor, ratio: float) -> tuple[torch.Tensor, int]:
    """Per-sample source positions ([N, size]) into the side padded by `pad`, for an integer shift uniform
    in [-pad, pad], pad = round(ratio * size)."""
    pad = int(size * ratio + 0.5)
    shift = (u * (2 * pad + 1)).long().clamp_(max=2 * pad) - pad
    return torch.arange(size, device=u.device) + pad - shift[:, None], pad


def _translation(x: torch.Tensor, prm: Params) -> torch.Tensor:
    n, c, h, w = x.shape
    u = prm["translation_u"]
    rows, ph = _shift_index(h, u[:, 0], TRANSLATION_RATIO)
    cols, pw = _shift_index(w, u[:, 1], TRANSLATION_RATIO)
    padded = F.pad(x, (pw, pw, ph, ph))
    # out[i, j] = x[i - dy, j - dx] (0 outside): gathers copy values exactly (no interpolation)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pw))
    out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    return _gate(prm["translation"], out, x)


def _color(x: torch.Tensor, prm: Params) -> torch.Tensor:
    def factor(name: str, lo: float, span: float) -> torch.Tensor:
        return (prm[f"{name}_u"] * span + lo).to(x.dtype).view(-1, 1, 1, 1)

    x = _gate(prm["brightness"], x + factor("brightness", -0.5, 1.0), x)
    mean = x.mean(dim=1, keepdim=True)
    x = _gate(prm["saturation"], (x - mean) * factor("saturation", 0.0, 2.0) + mean, x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return _gate(prm["contrast"], (x - mean) * factor("contrast", 0.5, 1.0) + mean, x)


def _cutout(x: torch.Tensor, prm: Params) -> torch.Tensor:
    n, _, h, w = x.shape
    u = prm["cutout_u"]

    def inside(size: int, u: torch.Tensor) -> torch.Tensor:  # [N, size]: rows (or columns) the square covers
        side = int(size * CUTOUT_RATIO + 0.5)
        centre = (u * (size + 1 - side % 2)).long()
        start = (centre - side // 2)[:, None]
        pos = torch.arange(size, device=u.device)
        return (pos >= start) & (pos < start + side)

    hole = inside(h, u[:, 0])[:, :, None] & inside(w, u[:, 1])[:, None, :] & prm["cutout"].view(-1, 1, 1)
    return x * (~hole).to(x.dtype)[:, None]


_OPS: tuple[tuple[str, Callable[[torch.Tensor, Params], torch.Tensor]], ...] = (
    ("flip", _flip), ("rot90", _rot90), ("translation", _translation), ("brightness", _color),
    ("cutout", _cutout),
)


class Augment:
    """One run's augmentation: the policy, the current p (fixed, scheduled or adaptive), the parameter stream
    shared by every rank, and ADA's window statistics (module docstring).

    The engine calls `sample(batch)` per batch D will see (outside compiled code), `apply` inside the forward,
    `observe` with each D step's real-side outputs, and `adjust` once per outer step (it reads the device only
    at the end of a window). `set_p` is how a schedule drives p."""

    def __init__(self, policy: Sequence[str], p: float | str = 0.0, *, seed: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, target: float = 0.6, adjust_every: int = 4,
                 speed_images: int = 500_000, p_max: float = 1.0) -> None:
        self.policy = check_policy(policy)
        self.adaptive = p == "adaptive"
        self.p = 0.0 if self.adaptive else float(p)  # ADA starts from 0
        self.rank, self.world_size = rank, world_size
        self.target, self.adjust_every, self.speed_images, self.p_max = target, adjust_every, speed_images, p_max
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed * 7919 + AUGMENT_SEED_OFFSET)
        # ADA's window: sum of signs and number of images, this rank's, float64 so the sums of +-1 are exact
        self.window = torch.zeros(2, dtype=torch.float64, device=self.device)

    @property
    def enabled(self) -> bool:
        """Whether `sample` draws anything: a policy, and p > 0 or p that may rise (adaptive)."""
        return bool(self.policy) and (self.adaptive or self.p > 0)

    def sample(self, batch: int) -> Params | None:
        """This rank's parameters for its next `batch` images (the global batch's draw, sliced; every rank must
        call it with the same batch). None while p is 0: nothing is drawn and `apply` is the identity, which
        keeps a run with p = 0 bit for bit the run without augmentation."""
        if not self.policy or self.p <= 0:
            return None
        full = draw(self.policy, batch * self.world_size, self.p, self.generator, self.device)
        lo = self.rank * batch
        return {k: v[lo: lo + batch] for k, v in full.items()}

    apply = staticmethod(apply)

    def set_p(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
        self.p = float(p)

    def observe(self, logits: torch.Tensor) -> None:
        """Add the signs of D's real-side outputs (module docstring) to the window, on the device."""
        if self.adaptive:
            d = logits.detach().reshape(-1)
            self.window += torch.stack([d.sign().sum().double(), d.new_tensor(float(d.numel())).double()])

    def adjust(self, step: int, reduce_mean: Callable[[dict[str, torch.Tensor]], dict[str, float]]) -> float | None:
        """At the end of a window (`step` outer steps done, a multiple of adjust_every): move p by ADA's rule
        from the window over all ranks (`reduce_mean`: the strategy's mean over ranks, a collective, so every
        rank calls `adjust` at the same steps), start a new window, and return r_t. Else nothing (no read)."""
        if not self.adaptive or step % self.adjust_every:
            return None
        means = reduce_mean({"signs": self.window[0], "count": self.window[1]})
        self.window.zero_()
        if means["count"] <= 0:
            return None
        r_t = means["signs"] / means["count"]
        direction = (r_t > self.target) - (r_t < self.target)
        images = means["count"] * self.world_size
        self.p = min(max(self.p + direction * images / self.speed_images, 0.0), self.p_max)
        return r_t

    def state_dict(self) -> dict[str, Any]:
        """p and the parameter stream: the same on every rank. The window is each rank's own (`window`)."""
        return {"p": self.p, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.p = float(state["p"])
        self.generator.set_state(state["generator"])


def from_config(cfg: Config, *, rank: int, world_size: int, device: torch.device) -> Augment | None:
    """The run's augmenter, or None where D never sees an augmented image (no policy, p fixed at 0): then
    nothing is drawn or applied, and the run is bit for bit what it was without this module."""
    a = cfg.augment
    if not a.policy or (a.p != "adaptive" and a.p == 0 and not cfg.schedule.augment_p_end):
        return None
    return Augment(a.policy, a.p, seed=cfg.train.seed, device=device, rank=rank, world_size=world_size,
                   target=a.target, adjust_every=a.adjust_every, speed_images=a.speed_images, p_max=a.p_max)
