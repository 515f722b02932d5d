"""Worker programs for tests/test_distributed.py: run as a plain process or under torchrun.

Not a test module (pytest collects test_*.py only). Each scenario drives the real Trainer and strategy;
what it controls is only the input stream, so that two different distributions of the same work can be
compared number for number.

  leak OUT         D's gradients from the G step never reach D's update (DeepSpeed, every ZeRO stage
                   we support, fp32 and bf16), with a control that shows the check can see a leak.
  equiv OUT ARGS   K outer steps of the Trainer on one global stream of reals and noise, each rank
                   taking its slice: run with B per rank under DDP and 2B on one process, the weights
                   must agree. Writes rank 0's G/D/EMA to OUT.
  grads OUT ARGS   D and G gradients (as the strategy averages them, before any optimizer step) of one
                   D step and one G step of the Trainer on the same global stream, for every Ra/Rc loss
                   and both loss.batch_stats. Writes rank 0's to OUT.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rgan_dist import losses  # noqa: E402
from rgan_dist.config import load_config  # noqa: E402
from rgan_dist.data import load_digits_uint8, to_model_input  # noqa: E402
from rgan_dist.engine.loop import Trainer  # noqa: E402
from rgan_dist.engine.strategy import make_strategy  # noqa: E402

TINY = ["model.resolution=16", "model.width=8", "model.z_dim=16", "train.progress=false",
        "tracking.enabled=false", "model.channels=1"]


def _d_step_on(t: Trainer, real: torch.Tensor, fake: torch.Tensor) -> None:
    """One D update on fixed inputs, through the strategy's D path (forward, one backward, step)."""
    s = t.s
    loss = losses.d_loss(t.cfg.loss.name, s.d(real), s.d(fake))
    s.backward_step("d", loss)


def leak(out: Path) -> None:
    results, trainers = [], []
    for stage, precision in ((0, "fp32"), (1, "bf16"), (2, "fp32")):
        def trainer(stage: int = stage, precision: str = precision) -> Trainer:
            cfg = load_config(None, [*TINY, "train.batch_size=8", "dist.strategy=deepspeed",
                                     f"train.precision={precision}", f"run.out_dir={out}/run",
                                     f'dist.deepspeed_config={{"zero_optimization": {{"stage": {stage}}}}}'])
            return Trainer(cfg, strategy=make_strategy(cfg))

        a, b, c = trainer(), trainer(), trainer()
        real = a._reals()
        fake = torch.randn(real.shape, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
        # A: G step (D frozen, as the loop does), then D's update on fixed inputs.
        a.g_step(real)
        no_grad_on_d = all(p.grad is None for p in a.s.d_module.parameters())
        _d_step_on(a, real, fake)
        # B: the same D update with no G step before it.
        _d_step_on(b, real, fake)
        # C, the control: a G step with D left trainable, i.e. what a missing freeze would do.
        # ZeRO-2 notices the stray gradient itself (it refuses to reduce a gradient twice); the others
        # silently fold it into D's update, which the comparison with B shows.
        c.s.frozen_d = contextlib.nullcontext  # type: ignore[method-assign]
        c.g_step(real)
        control_grad_on_d = any(p.grad is not None for p in c.s.d_module.parameters())
        try:
            _d_step_on(c, real, fake)
            control = "differs" if any(not torch.equal(x, y) for x, y in zip(
                c.s.d_module.parameters(), b.s.d_module.parameters(), strict=True)) else "equal"
        except AssertionError as e:
            control = f"raised: {str(e).split(chr(10))[0][:80]}"
        da, db = (list(x.s.d_module.parameters()) for x in (a, b))
        results.append({
            "stage": stage, "precision": precision, "no_grad_on_d_after_g_step": no_grad_on_d,
            "d_equal_with_and_without_g_step": all(torch.equal(x, y) for x, y in zip(da, db, strict=True)),
            "control_grad_on_d": control_grad_on_d, "control": control,
        })
        trainers += [a, b, c]
    # One process group for all of them (DeepSpeed caches its groups): the first strategy owns it.
    for x in reversed(trainers):
        x.s.close()
    torch.save(results, out / "leak.pt")
    print("leak:", results, flush=True)


class _SlicedStreamTrainer(Trainer):
    """Reals and noise come from one global stream (seeded the same on every rank); rank r of W takes
    slice r of each draw of W*n. B per rank on W ranks then sees exactly the data of W*B on one process."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.images = load_digits_uint8(self.cfg.model.resolution, self.cfg.model.channels)
        self.stream = torch.Generator().manual_seed(1234)

    def _slice(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // self.s.world_size
        return x[self.s.rank * n:(self.s.rank + 1) * n]

    def _reals(self) -> torch.Tensor:
        n = self.cfg.train.batch_size * self.s.world_size
        idx = torch.randint(len(self.images), (n,), generator=self.stream)
        return to_model_input(self._slice(self.images[idx]), self.s.device)

    def _z(self, n: int) -> torch.Tensor:
        z = torch.randn(n * self.s.world_size, self.cfg.model.z_dim, generator=self.stream)
        return self._slice(z).to(self.s.device)


def equiv(out: Path, overrides: list[str]) -> None:
    cfg = load_config(None, [*TINY, f"run.out_dir={out}/run", *overrides])
    s = make_strategy(cfg)
    try:
        t = _SlicedStreamTrainer(cfg, strategy=s)
        for _ in range(cfg.train.steps):
            t.train_step()
        if s.is_main:
            torch.save({"G": t.s.g_module.state_dict(), "D": t.s.d_module.state_dict(),
                        "EMA": t.ema.module.state_dict()}, out / f"equiv-{s.name}-{s.world_size}.pt")
        s.barrier()
    finally:
        s.close()


# The losses with a batch reference statistic (Ra: m(r), m(f); Rc: their midpoint c).
REFERENCE_STAT_LOSSES = ("rasgan", "ralsgan", "rahinge", "rcsgan", "rclsgan", "rchinge")


@torch.no_grad()
def _spread(module: torch.nn.Module, seed: int) -> None:
    """Re-draw the weights (the same on every rank) at a scale where logits spread over several units. At
    DCGAN's N(0, 0.02) init every logit is ~1e-3: the hinge terms are all linear, where the batch mean
    changes no averaged gradient, and the other losses barely notice it, so global and local would agree."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=g) * (8 / p[0].numel()) ** 0.5)
        else:
            p.zero_()


def grads(out: Path, overrides: list[str]) -> None:
    cfg = load_config(None, [*TINY, f"run.out_dir={out}/run", *overrides])
    s = make_strategy(cfg)
    try:
        t = _SlicedStreamTrainer(cfg, strategy=s)
        _spread(s.g_module, seed=7)
        _spread(s.d_module, seed=8)
        captured: dict[str, list[torch.Tensor]] = {}

        def backward_only(phase: str, loss: torch.Tensor) -> None:
            # The strategy's backward without the optimizer step: DDP has averaged the ranks' gradients.
            loss.backward()
            module = s.d_module if phase == "d" else s.g_module
            captured[phase] = [p.grad.detach().clone() for p in module.parameters()]
            s.zero_grad(phase)

        s.backward_step = backward_only  # type: ignore[method-assign]
        results = {}
        for name in REFERENCE_STAT_LOSSES:
            for stats in ("global", "local"):
                # The strategy reads the config at every call: one Trainer serves every variant.
                cfg.loss.name, cfg.loss.batch_stats = name, stats
                t.stream.manual_seed(1234)  # the same reals and noise for every variant
                real = t._reals()
                t.d_step(real)
                t.g_step(real)
                results[f"{name}/{stats}"] = {"d": captured["d"], "g": captured["g"]}
        if s.is_main:
            torch.save(results, out / f"grads-{s.name}-{s.world_size}.pt")
        s.barrier()
    finally:
        s.close()


if __name__ == "__main__":
    scenario, out_dir, *rest = sys.argv[1:]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    {"leak": lambda: leak(Path(out_dir)), "equiv": lambda: equiv(Path(out_dir), rest),
     "grads": lambda: grads(Path(out_dir), rest)}[scenario]()
