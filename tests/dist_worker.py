"""Worker programs for tests/test_distributed.py: run as a plain process or under torchrun.

Not a test module (pytest collects test_*.py only). Each scenario drives the real Trainer and strategy;
what it controls is only the input stream, so that two different distributions of the same work can be
compared number for number.

  leak OUT         D's gradients from the G step never reach D's update (DeepSpeed, every ZeRO stage
                   we support, fp32 and bf16), with a control that shows the check can see a leak.
  equiv OUT ARGS   K outer steps of the Trainer on one global stream of reals and noise, each rank
                   taking its slice: run with B per rank under DDP and 2B on one process, the weights
                   must agree. Writes rank 0's G/D/EMA to OUT.
  deepspeed OUT    2 ranks, every DeepSpeed check at once (see `deepspeed_checks`); `reference OUT` is
                   its one-process side.
  sync_free OUT    2 ranks: DDP and DeepSpeed (ZeRO 0, 1, 2) training steps with every host read of a tensor
                   refused (`sync_free_steps`), then a NaN D loss on one rank skipped on every rank
                   (`nan_step_is_skipped`).
  grads OUT ARGS   D and G gradients (as the strategy averages them, before any optimizer step) of one
                   D step and one G step of the Trainer on the same global stream, for every Ra/Rc loss
                   and both loss.batch_stats. Writes rank 0's to OUT.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from conftest import TINY  # this script's folder, tests/, is sys.path[0]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rgan_dist import losses  # noqa: E402
from rgan_dist.config import load_config  # noqa: E402
from rgan_dist.data import load_digits_uint8, to_model_input  # noqa: E402
from rgan_dist.engine import make_strategy  # noqa: E402
from rgan_dist.engine.loop import Trainer  # noqa: E402
from rgan_dist.engine.state import fingerprints  # noqa: E402

# base.yaml (load_config(None, ...)) underneath: 3 channels unless told, and MLflow on.
BASE = [*TINY, "tracking.enabled=false", "model.channels=1"]


def _d_step_on(t: Trainer, real: torch.Tensor, fake: torch.Tensor) -> None:
    """One D update on fixed inputs, through the strategy's D path (forward, one backward, step)."""
    s = t.strategy
    loss = losses.d_loss(t.cfg.loss.name, s.run_D(real), s.run_D(fake))
    s.backward_step("d", loss)


def leak(out: Path) -> None:
    results, trainers = [], []
    for stage, precision in ((0, "fp32"), (1, "bf16"), (2, "fp32")):
        def trainer(stage: int = stage, precision: str = precision) -> Trainer:
            cfg = load_config(None, [*BASE, "train.batch_size=8", "dist.strategy=deepspeed",
                                     f"train.precision={precision}", f"run.out_dir={out}/run",
                                     f'dist.deepspeed_config={{"zero_optimization": {{"stage": {stage}}}}}'])
            return Trainer(cfg, strategy=make_strategy(cfg))

        a, b, c = trainer(), trainer(), trainer()
        real = a._reals()
        fake = torch.randn(real.shape, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
        # A: G step (D frozen, as the loop does), then D's update on fixed inputs.
        a.gan.g_step(real, a.step)
        no_grad_on_d = all(p.grad is None for p in a.strategy.D.parameters())
        _d_step_on(a, real, fake)
        # B: the same D update with no G step before it.
        _d_step_on(b, real, fake)
        # C, the control: a G step with D left trainable, i.e. what a missing freeze would do.
        # ZeRO-2 notices the stray gradient itself (it refuses to reduce a gradient twice); the others
        # silently fold it into D's update, which the comparison with B shows.
        c.strategy.frozen_d = contextlib.nullcontext  # type: ignore[method-assign]
        c.gan.g_step(real, c.step)
        control_grad_on_d = any(p.grad is not None for p in c.strategy.D.parameters())
        try:
            _d_step_on(c, real, fake)
            control = "differs" if any(not torch.equal(x, y) for x, y in zip(
                c.strategy.D.parameters(), b.strategy.D.parameters(), strict=True)) else "equal"
        except AssertionError as e:
            control = f"raised: {str(e).split(chr(10))[0][:80]}"
        da, db = (list(x.strategy.D.parameters()) for x in (a, b))
        results.append({
            "stage": stage, "precision": precision, "no_grad_on_d_after_g_step": no_grad_on_d,
            "d_equal_with_and_without_g_step": all(torch.equal(x, y) for x, y in zip(da, db, strict=True)),
            "control_grad_on_d": control_grad_on_d, "control": control,
        })
        trainers += [a, b, c]
    # One process group for all of them (DeepSpeed caches its groups): the first strategy owns it.
    for x in reversed(trainers):
        x.strategy.close()
    torch.save(results, out / "leak.pt")
    print("leak:", results, flush=True)


class _SlicedStreamTrainer(Trainer):
    """Reals and noise come from one global stream (seeded the same on every rank); rank r of W takes
    slice r of each draw of W*n. B per rank on W ranks then sees exactly the data of W*B on one process."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.images = load_digits_uint8(self.cfg.model.resolution, self.cfg.model.channels)
        self.stream = torch.Generator().manual_seed(1234)
        self.gan.z = self._z  # the steps' noise (engine.step.GANStep.z) from the same global stream

    def _slice(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // self.strategy.world_size
        return x[self.strategy.rank * n:(self.strategy.rank + 1) * n]

    def _reals(self) -> torch.Tensor:
        n = self.cfg.train.batch_size * self.strategy.world_size
        idx = torch.randint(len(self.images), (n,), generator=self.stream)
        return to_model_input(self._slice(self.images[idx]), self.strategy.device)

    def _z(self, n: int) -> torch.Tensor:
        z = torch.randn(n * self.strategy.world_size, self.cfg.model.z_dim, generator=self.stream)
        return self._slice(z).to(self.strategy.device)


def _equiv_run(t: _SlicedStreamTrainer) -> dict[str, dict[str, torch.Tensor]]:
    """`train.steps` outer steps of the Trainer on the global stream; the resulting G/D/EMA weights (and the
    augmentation's p, where there is one, as a one-element tensor)."""
    for _ in range(t.cfg.train.steps):
        t.train_step()
    out = {"G": t.strategy.G.state_dict(), "D": t.strategy.D.state_dict(), "EMA": t.ema.module.state_dict()}
    if t.augment is not None:
        out["augment"] = {"p": torch.tensor([t.augment.p], dtype=torch.float64)}
    return out


def equiv(out: Path, overrides: list[str]) -> None:
    cfg = load_config(None, [*BASE, f"run.out_dir={out}/run", *overrides])
    s = make_strategy(cfg)
    try:
        weights = _equiv_run(_SlicedStreamTrainer(cfg, strategy=s))
        if s.is_main:
            torch.save(weights, out / f"equiv-{s.name}-{s.world_size}.pt")
        s.barrier()
    finally:
        s.close()


# DeepSpeed (2 ranks x B=4) against one process (B=8), by name: the training setups `deepspeed` runs under each
# ZeRO stage listed, and `reference` runs on one process. No BatchNorm (per rank by design); 4 steps, EMA 0.9.
# A 10x learning rate moves the logits off their ~1e-3 at init within these steps: there per-rank batch means
# change the weights measurably (rasgan under DDP, after 4 steps: 7e-4 with local means, 1.5e-8 global).
EQUIV_COMMON = ["model.g_batch_norm=false", "model.d_batch_norm=false", "train.steps=4", "train.ema=0.9",
                "train.lr_d=0.002", "train.lr_g=0.002"]
# Every augmentation op at adaptive p (moved after each step by the statistic over all ranks) and every ramp
# over the 4 steps: the same global sample gets the same transform on any number of ranks (rgan_dist.augment).
AUGMENTED = ["augment.policy=[flip, rot90, translation, color, cutout]", "augment.p=adaptive",
             "augment.adjust_every=1", "augment.speed_images=16", "augment.target=0.0", "schedule.images=32",
             "schedule.lr_end=5e-4", "schedule.beta2_end=0.99", "schedule.gamma_end=1.0", "schedule.ema_half_life=8"]
EQUIV_SETUPS = {
    "rsgan-r1": ["loss.name=rsgan", "loss.penalty=r1"],  # paired: no batch statistic involved
    "rasgan-r1": ["loss.name=rasgan", "loss.penalty=r1"],  # loss.batch_stats=global, the default
    "rsgan-r1-augmented": ["loss.name=rsgan", "loss.penalty=r1", *AUGMENTED],
}
DEEPSPEED_EQUIV = [(1, "rsgan-r1"), (2, "rsgan-r1"), (2, "rasgan-r1"), (2, "rsgan-r1-augmented")]


def _zero(stage: int) -> str:
    return f'dist.deepspeed_config={{"zero_optimization": {{"stage": {stage}}}}}'


def reference(out: Path) -> None:
    """The one-process side of `deepspeed`'s equivalence runs (single strategy, B=8)."""
    for name, setup in EQUIV_SETUPS.items():
        cfg = load_config(None, [*BASE, f"run.out_dir={out}/ref-{name}", *EQUIV_COMMON, *setup, "train.batch_size=8"])
        torch.save(_equiv_run(_SlicedStreamTrainer(cfg, strategy=make_strategy(cfg))), out / f"ref-{name}.pt")


def deepspeed_checks(out: Path) -> None:
    """Every 2-rank DeepSpeed check in one process group (each job pays ~20 s of DeepSpeed start-up):

    - equivalence: `DEEPSPEED_EQUIV` at B=4 per rank, weights to ds-zero<stage>-<setup>.pt (rank 0's);
    - spectral norm + ZeRO-1 + bf16 (BatchNorm on, as by default): after step 1 every rank's D buffers and
      fingerprints, to sn.pt; then the same Trainer goes on with `fit()` to step 6 (checkpoints at 3 and
      6, in OUT/a), and a fresh Trainer with fresh engines resumes OUT/a's step 3 into OUT/b and runs to 6:
      the test compares the two step-6 checkpoints."""
    strategies = []

    def trainer(cls: type[Trainer], *overrides: str) -> Trainer:
        cfg = load_config(None, [*BASE, *overrides])
        strategies.append(make_strategy(cfg))
        return cls(cfg, strategy=strategies[-1])

    try:
        for stage, name in DEEPSPEED_EQUIV:
            t = trainer(_SlicedStreamTrainer, f"run.out_dir={out}/ds-{stage}-{name}", "dist.strategy=deepspeed",
                        _zero(stage), *EQUIV_COMMON, *EQUIV_SETUPS[name], "train.batch_size=4")
            weights = _equiv_run(t)
            if t.strategy.is_main:
                torch.save(weights, out / f"ds-zero{stage}-{name}.pt")
        sn = ["dist.strategy=deepspeed", _zero(1), "model.spectral_norm=true", "train.precision=bf16",
              "train.batch_size=4", "train.steps=6", "checkpoint.every=3", "checkpoint.keep=5",
              "train.sample_every=0"]
        a = trainer(Trainer, f"run.out_dir={out}/a", *sn)
        a.train_step()
        buffers = {k: v.detach().clone() for k, v in a.strategy.D.named_buffers()}
        seen = a.strategy.all_gather_object({"buffers": buffers, "fingerprint": fingerprints(a)})
        if a.strategy.is_main:
            torch.save(seen, out / "sn.pt")
        a.fit()
        b = trainer(Trainer, f"run.out_dir={out}/b", *sn,
                    f"checkpoint.resume={out}/a/checkpoints/ckpt-00000003.pt")
        assert b.step == 3
        b.fit()
    finally:
        for s in reversed(strategies):  # the first strategy owns the process group: it goes last
            s.close()


# Every way a tensor's value reaches the host: on a GPU each one waits for the queue to drain.
HOST_READS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Make every `HOST_READS` method of torch.Tensor raise while inside: what a sync-free step must not call
    (on CPU there is no queue to drain, so this is how a CPU test sees a GPU's synchronisation)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name: str):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor (Tensor.{name}) during a training step")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def sync_free_steps(t: Trainer, steps: int = 3) -> None:
    """One warm-up step (the optimizers create their state on the first), then `steps` outer steps, none of
    them logged, with every host read refused. Data loading included: the batches are decoded on the host
    from uint8 and only then moved, so the stream itself reads no device value either."""
    assert t.cfg.train.log_every > steps + 1, "logged steps read metrics on the host by design"
    t.train_step()
    with no_host_reads():
        for _ in range(steps):
            t.train_step()


def _client_state(opt: object) -> list[torch.Tensor]:
    """Every tensor of the torch Adam's state (under DeepSpeed ZeRO, the one its wrapper holds)."""
    inner = getattr(opt, "optimizer", opt)
    return [v.detach().clone() for st in inner.state.values() for v in st.values() if torch.is_tensor(v)]


def nan_step_is_skipped(t: Trainer, bad_rank: int) -> None:
    """One outer step whose D loss is NaN on `bad_rank` only: every rank skips D's update on the device (weights,
    Adam moments and step count bitwise unchanged, `d_stepped` 0, one bad step counted), G still steps."""
    s = t.strategy
    d_before, opt_before = [p.detach().clone() for p in s.D.parameters()], _client_state(s.opt["d"])
    g_before = [p.detach().clone() for p in s.G.parameters()]
    real_d_loss = losses.d_loss

    def nan_here(*args, **kwargs):
        loss = real_d_loss(*args, **kwargs)
        return loss * float("nan") if s.rank == bad_rank else loss

    losses.d_loss = nan_here
    try:
        out = t.train_step()
    finally:
        losses.d_loss = real_d_loss
    assert out["d_stepped"].tolist() == 0.0 and out["g_stepped"].tolist() == 1.0, out
    for a, b in zip(d_before, s.D.parameters(), strict=True):
        assert torch.equal(a, b), "a skipped D step changed D"
    opt_after = _client_state(s.opt["d"])
    assert len(opt_after) == len(opt_before) and all(map(torch.equal, opt_before, opt_after)), "Adam state moved"
    assert any(not torch.equal(a, b) for a, b in zip(g_before, s.G.parameters(), strict=True)), "G did not step"
    assert t.bad_steps_total == 1


def sync_free(out: Path) -> None:
    strategies = []
    setups = {"ddp": ["dist.strategy=ddp"], **{f"deepspeed-zero{z}": ["dist.strategy=deepspeed", _zero(z)]
                                              for z in (0, 1, 2)}}
    try:
        for name, setup in setups.items():
            cfg = load_config(None, [*BASE, f"run.out_dir={out}/{name}", "train.batch_size=4", "train.log_every=100",
                                     "loss.penalty=r1", "model.d_batch_norm=false", *setup])
            strategies.append(make_strategy(cfg))
            t = Trainer(cfg, strategy=strategies[-1])
            sync_free_steps(t)
            nan_step_is_skipped(t, bad_rank=t.strategy.world_size - 1)
            print(f"sync-free: {name} rank {t.strategy.rank} ok", flush=True)
    finally:
        for s in reversed(strategies):  # the first strategy owns the process group: it goes last
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
    cfg = load_config(None, [*BASE, f"run.out_dir={out}/run", *overrides])
    s = make_strategy(cfg)
    try:
        t = _SlicedStreamTrainer(cfg, strategy=s)
        _spread(s.G, seed=7)
        _spread(s.D, seed=8)
        captured: dict[str, list[torch.Tensor]] = {}

        def backward_only(phase: str, loss: torch.Tensor, finite: torch.Tensor | None = None) -> None:
            # The strategy's backward without the optimizer step: DDP has averaged the ranks' gradients.
            loss.backward()
            module = s.D if phase == "d" else s.G
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
                t.gan.d_step(real, t.step)
                t.gan.g_step(real, t.step)
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
     "grads": lambda: grads(Path(out_dir), rest), "reference": lambda: reference(Path(out_dir)),
     "deepspeed": lambda: deepspeed_checks(Path(out_dir)), "sync_free": lambda: sync_free(Path(out_dir))}[scenario]()
