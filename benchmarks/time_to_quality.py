"""Time to quality: every loss variant trains for the same compute budget; quality is measured at fixed
points of that budget, over several seeds. The experiment to run before trusting a loss.

Usage (a fresh clone, after `pip install -e .`; emoji need `bash ../shared/data/emoji.sh data/emoji`):

    python benchmarks/time_to_quality.py --profile smoke                 # ~1-2 min, what the test runs
    nohup python benchmarks/time_to_quality.py --profile cpu --out runs/ttq-cpu > ttq-cpu.log 2>&1 &
    nohup python benchmarks/time_to_quality.py --profile cpu-long --out runs/ttq-long > ttq-long.log 2>&1 &
    python benchmarks/time_to_quality.py --profile gpu --out runs/ttq-gpu
    python benchmarks/time_to_quality.py --out runs/ttq-cpu --report-only   # table + plots from the JSON

Rerunning the same command continues a killed benchmark: finished (workload, variant, seed) runs are kept
in `<out>/results.json` and skipped; an unfinished run starts again from scratch.

**The budget clock.** Every run gets the same compute budget and is judged at the same fractions of it.
- CPU profile (`clock: process_cpu`): the CPU seconds of the run's own process (`time.process_time`), with
  torch fixed to 1 thread and data decoded in that process (`data.workers=0`). On a shared machine wall
  time depends on whatever else runs; one thread's CPU time does not, and equals the wall time the run
  would take alone on one core. Runs go in separate processes, `--parallel` at a time (2 on a 2-core box).
- GPU profile (`clock: wall`): wall seconds, `torch.cuda.synchronize()` before each clock read, so queued
  kernels are paid for by the step that queued them. Run one process per GPU (`--parallel 1` on one GPU);
  runs sharing a GPU slow each other down and their wall clocks say so.
- Evaluation (metric, sample grid) is excluded from the budget: the clock is read around each
  `Trainer.train_step()` only. Wall seconds (training only, and in all) are recorded beside it.
The clock is named in the JSON (`clock`) and in the table header.

**What runs.** Each run is the project's own `Trainer` (config `configs/benchmarks/time_to_quality.yaml`
+ workload + profile + variant + seed overrides, through `rgan_dist.config.load_config`): the benchmark
calls `trainer.train_step()` until the next budget point, then `trainer.evaluate()` (the evaluator the
config asks for) and `trainer.save_samples()`. No second training loop.

**Variants** (`--variants`, keys or labels): the paper's two optimizer setups, as in `configs/paper/`:
- no penalty: setup 1 of Table 1, lr 2e-4, Adam betas (0.5, 0.999), n_D = 1, on the paper's stable D:
  spectral norm on every D conv, no BatchNorm in D (the official `stable.sh --spectral True`; REFERENCES.md,
  "Architectures"). `sgan-bn`/`rasgan-bn` keep DCGAN's BatchNorm D: an extra row, not the paper's setup
  (with it RaSGAN collapses in the official code too; REFERENCES.md, "The official code beside ours").
- WGAN-GP (n_D = 5), RSGAN-GP, RaSGAN-GP (n_D = 1): setup 2 of Table 1, lr 1e-4, betas (0.5, 0.9),
  penalty weight 10, no BatchNorm in D (a per-sample gradient penalty is ill-defined through batch
  statistics).
- RpGAN + R1 + R2 (R3GAN's objective, with our DCGAN, not R3GAN's network): setup-1 optimizer, no
  BatchNorm in D, gamma = 0.1 (R1 and R2 each gamma/2 E||grad||^2). R3GAN tunes gamma per data set;
  0.1 is our untuned choice for 32x32 images, not a value taken from its paper.
- The recipe (`recipe`; issue 21): a run starts from the project's recipe for the workload's kind of data,
  `configs/recipes/stacked_digits.yaml` (Stacked-Digits) or `configs/recipes/small_data.yaml` (emoji, small
  data): R3GAN's network, RpGAN + R1 + R2, Adam beta1 = 0, its ramps, the EMA, augmentation on small data. The
  recipe's method (model, loss, optimiser, EMA, augmentation, schedules) is read from the file, so it is defined
  once (`benchmarks/ttq/recipe.py`); the benchmark keeps the data, resolution, metric, seed and budget. Beside it,
  the recipe with one part swapped: `recipe-dcgan` (model.arch=dcgan), `recipe-rasgan`, `recipe-ralsgan`,
  `recipe-sgan` (loss.name), `recipe-noaug` (no `augment:`).

**Profiles**: `smoke` (the test), `cpu` (the paper's losses, ~1 h on 2 cores), `cpu-long` (issue 21: the
recipe and its swaps at 20 CPU-minutes a run, Stacked-Digits and small data; sizes and cost in
`benchmarks/ttq/profiles.py`), `gpu` (every variant, for a lent GPU; never in CI).

**Workloads**: `stacked` (Stacked-Digits 32x32, 1000 modes, metric `modes` and `modes_kl`; shards made
once with `rgan shards sklearn:stacked-digits --seed DATA_SEED`, the same images for every seed), `emoji` (real
emoji, 32x32 on CPU, 64x64 on GPU, FID + KID; shards made once from `--emoji-dir`) and `smalldata` (the seed
paper's small-data claim at its size: exactly 2,011 apple emoji at 64x64, a draw seeded by DATA_SEED, FID + KID
of N generated images against every apple emoji). The data seed is the profile's (`cpu-long`: one no recipe
was tuned on) or `--data-seed`; it is recorded with every run and checked on resume. FID reference statistics
are computed once, before the runs.

**Output** in `--out`: `results.json` (every point of every run, machine, torch, configs, clock; one run
appended as it finishes), `results.md` (the section that goes into benchmarks/RESULTS.md: per-seed table,
per-variant mean and min..max over seeds, time to target), `time_to_quality_<workload>.png` (metric vs
budget seconds, mean with a min..max band per variant), `runs/` (each run's samples and metrics.jsonl),
`logs/` (each run's output). MLflow: one parent run per benchmark (kept across resumed invocations), a
nested child run per variant/seed, metrics logged with step = budget seconds.

Time to target is the budget spent at the first evaluated point that meets the target, so its resolution
is the spacing of the points; a target of `final:VARIANT` is that variant's mean final value (e.g.
`--target-fid final:wgan-gp` asks "when does each variant reach WGAN-GP's final FID?").
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # run as a script: the repository root, where `benchmarks.ttq` lives
    sys.path.insert(0, _ROOT)

# The package's entry, and the parts tests load from this script by path under the names it always had.
from benchmarks.ttq.cli import main, parse_args  # noqa: E402
from benchmarks.ttq.measure import (  # noqa: E402
    budget_points,
    check_target,
    resolve_target,
    spread,
    time_to_target,
    train_until,
    variant_key,
)
from benchmarks.ttq.profiles import CONFIG, PROFILES, VARIANTS  # noqa: E402
from benchmarks.ttq.report import markdown_report, workload_section  # noqa: E402
from benchmarks.ttq.run import BudgetStepTracker, plan_runs  # noqa: E402

__all__ = ["CONFIG", "PROFILES", "VARIANTS", "BudgetStepTracker", "budget_points", "check_target", "main",
           "markdown_report", "parse_args", "plan_runs", "resolve_target", "spread", "time_to_target", "train_until",
           "variant_key", "workload_section"]

if __name__ == "__main__":
    sys.exit(main())
