"""Ray Tune sweeps: many loss variants x hyperparameter setups, each trial the ordinary training loop.

A sweep file (`configs/sweeps/*.yaml`, format in `configs/sweeps/smoke.yaml`) names a base training
config, fixed overrides, a search space over dotted config keys, a scheduler and per-trial resources.
It is read by the training config's own machinery (`spec.py`): one config language, one kind of error.
`run_sweep` turns it into one Ray Tune run:

- Each trial is the same `Trainer` as `rgan train`, built from base + overrides + the trial's sampled
  values. One process per trial (`resources.workers: 1`, CPU or one GPU), or, with `workers > 1`, a Ray
  Train `TorchTrainer` started inside the trial (Train V2: a plain Tune function builds the
  TorchTrainer; its workers run DDP/DeepSpeed through our strategies, reporting with
  `ray.train.report`, forwarded to Tune by `TuneReportCallback`).
- Trials report at every FID evaluation (`eval.every`): `fid`, `best_fid` and `step` (the scheduler's
  time axis, in generator steps), together with a Ray checkpoint holding our own checkpoint file. A
  failed trial (`max_failures`) and a PBT exploit restart from such a checkpoint through
  `checkpoint.resume`, so model, optimizers, EMA, RNG and data position continue exactly.
- ASHA (early stopping) and PBT (exploit/explore of lr, betas, ...) minimise FID; FIFO runs every trial
  to the end (what reproducing a table needs).
- MLflow: one parent run per sweep; each trial is a nested child run made by the same tracker as a
  single `rgan train` run (same params, metrics, artifacts), so the UI compares variants side by side.
- The sweep survives its driver: `Tuner.restore` continues it (`rgan sweep --resume`), and the MLflow
  parent run id is kept in `<out_dir>/sweep.json`.
- At the end, a table of trials sorted by best FID is printed and written to `<out_dir>/results.md`
  (plus `.csv` and `.json`), with the paper's value beside each trial when the sweep names a paper table.

Modules: `spec` (the file), `space` (search spaces, schedulers, trial names), `trial` (one trial),
`parent` (the MLflow parent run), `results` (the table), `driver` (`run_sweep`).

Paths in the base config (data, DeepSpeed JSON, Inception file) are made absolute on the driver, because
Tune runs each trial in its own working directory. On a cluster (`--address`) trials run on other machines:
`storage` (a folder every node mounts, or s3://) is required and holds the outputs; the data must be shared
(`data_root`, an absolute `data.shards` or a URL); other relative paths resolve in each trial against the
checkout it runs, which the driver ships as the Ray runtime_env working_dir (or `ray job submit
--working-dir .` did).
"""

from rgan_dist.sweep.driver import SweepResult, run_sweep
from rgan_dist.sweep.parent import ParentRun
from rgan_dist.sweep.results import TrialRow, collect_rows, results_table, write_results
from rgan_dist.sweep.space import (
    describe_trial,
    make_scheduler,
    param_space,
    planned_trials,
    trial_index,
    trial_overrides,
    trial_run_name,
)
from rgan_dist.sweep.spec import ResourcesConfig, SchedulerConfig, SweepConfig, find_file, load_sweep
from rgan_dist.sweep.trial import SWEEP_FAULT_ENV, FaultOnce, Reporter, TrialHooks, TrialSetup, run_trial, trial_main

__all__ = [
    "SWEEP_FAULT_ENV", "FaultOnce", "ParentRun", "Reporter", "ResourcesConfig", "SchedulerConfig", "SweepConfig",
    "SweepResult",
    "TrialHooks", "TrialRow", "TrialSetup", "collect_rows", "describe_trial", "find_file", "load_sweep",
    "make_scheduler", "param_space", "planned_trials", "results_table", "run_sweep", "run_trial", "trial_index",
    "trial_main", "trial_overrides", "trial_run_name", "write_results",
]
