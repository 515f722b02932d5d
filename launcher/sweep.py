"""`rgan sweep --config FILE [--address auto]`: a Ray Tune sweep of training runs (rgan_dist.sweep).

On a cluster, through Ray Jobs (the submitter's checkout travels as the job's working_dir; see README):
    ray job submit --address http://HEAD:8265 --working-dir . -- rgan sweep \
        --config configs/sweeps/paper_cifar10.yaml --address auto storage=/mnt/shared/sweeps ...
Also the script `ray submit` runs on a cluster's head node, where `rgan` may not be on PATH:
    ray submit --tmux launcher/cluster/aws-gpu.yaml launcher/sweep.py -- \
        --config configs/sweeps/paper_cifar10.yaml --address auto storage=/mnt/shared/sweeps ...
A relative `--config` that does not exist in the working directory is looked up in the source checkout
the package was installed from (in the Docker image: /opt/rgan-dist).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="sweep file (configs/sweeps/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="section.key=value: a key of every trial's training config (wins over the sweep file, "
                        "its space included); key=value without a dot: a sweep setting (storage=/mnt/shared/sweeps)")
    p.add_argument("--address", help="Ray cluster to join ('auto': the cluster of this node, e.g. under ray submit); "
                                     "default: start a local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started without --address")
    p.add_argument("--name", help="sweep name (default: the file's `name:`); a new name starts a new sweep")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep of this name after its driver died (Tune restores every trial)")
    from launcher.train import add_dry_run_arguments

    add_dry_run_arguments(p, "sweep")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune's console output (0: quiet)")


def run(args: argparse.Namespace) -> int:
    from launcher.train import check_dry_run_arguments
    from rgan_dist.sweep import load_sweep, run_sweep

    check_dry_run_arguments(args)
    spec = load_sweep(args.config, args.overrides, name=args.name, cluster=bool(args.address))
    if args.dry_run:
        from rgan_dist.sweep import describe_trial, planned_trials

        trials = planned_trials(spec)
        if not args.json:  # --json: the estimate alone, parseable
            print(f"rgan sweep: {spec.path} is valid: sweep {spec.name!r}, {len(trials)} trial(s) over "
                  f"{', '.join(spec.varied_keys)}; scheduler {spec.scheduler.name}; {spec.resources.workers} "
                  f"worker(s) per trial")
            for i, trial in enumerate(trials):
                print(f"  {i:03d}  " + "  ".join(f"{k}={v}" for k, v in describe_trial(trial).items()))
            print(f"rgan sweep: results would go to {spec.out_dir} (Ray experiment {spec.experiment_path})")
        _print_estimate(spec, args)
        return 0
    result = run_sweep(spec, address=args.address, num_cpus=args.num_cpus, resume=args.resume,
                       verbose=args.verbose)
    print()
    print(result.table)
    print()
    print(f"rgan sweep: results in {', '.join(str(p) for p in result.files)}")
    print(f"rgan sweep: Ray experiment {result.experiment_path} (continue it with --resume)")
    if result.parent_run_id:
        print(f"rgan sweep: MLflow parent run {result.parent_run_id}; compare the trials with: "
              f"rgan report --experiment {spec.base_config.tracking.experiment}")
    lines, code = outcome_summary(result.rows)
    for line in lines:
        print(line, file=sys.stderr if code else sys.stdout)
    return code


def outcome_summary(rows: list) -> tuple[list[str], int]:
    """What went wrong in a sweep, said after its table, and the exit code: 1 when any trial ended without a
    result (error, or no report at all; a worker that died and was not retried ends so), 0 otherwise. A trial
    that failed and that Tune retried from its checkpoint to the end is said, but is no failure."""
    lines = [f"rgan sweep: trial {r.name} failed and was retried from its checkpoint at step {r.restored_from_step}; "
             f"it ended {r.outcome}" for r in rows if r.restored_from_step and r.outcome not in ("error", "no report")]
    failed = [r for r in rows if r.outcome in ("error", "no report")]
    if failed:
        first = next((r for r in failed if r.error), failed[0])
        lines.append(f"rgan sweep: error: {len(failed)} of {len(rows)} trial(s) ended without a result ("
                     f"{', '.join(r.name for r in failed)}); first: {first.outcome}"
                     f"{': ' + first.error.splitlines()[0][:200] if first.error else ''}")
    return lines, 1 if failed else 0


def _print_estimate(spec, args: argparse.Namespace) -> None:
    """The sweep's cost (`rgan_dist.estimate`): each distinct trial config timed for a few steps here."""
    import json

    from rgan_dist.estimate import estimate_sweep, format_sweep

    est = estimate_sweep(spec, step_time=args.step_time, num_cpus=args.num_cpus, address=args.address)
    print(json.dumps(est.to_dict(), indent=1) if args.json else "\n".join(format_sweep(est)))


def main(argv: list[str] | None = None) -> int:
    """`python launcher/sweep.py ...` (what `ray submit` runs), the same as `rgan sweep ...`."""
    from launcher.cli import run_command

    p = argparse.ArgumentParser(prog="rgan sweep", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_command("rgan sweep", run, p.parse_args(argv), interrupted="interrupted; continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
