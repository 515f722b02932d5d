"""`rgan train` and `rgan demo`: resolve the config, then hand it to `rgan_dist.engine.loop.train`.

The same entry point serves a plain process, `torchrun` (rank/world from its environment variables)
and the `deepspeed` launcher (which appends `--local_rank=N`; accepted and ignored, LOCAL_RANK wins).
`run` is wrapped in torchelastic's `record`, so under torchrun a failing rank's traceback lands in the
job's error summary (which names the rank) instead of only in that worker's stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rgan_dist.config import describe_keys, dump_config, load_config
from rgan_dist.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see configs/; base.yaml documents every key)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config key")
    p.add_argument("--resume", help="'auto' (latest in checkpoint.dir) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a folder that holds another run: its checkpoints, metrics and samples "
                        "are moved to <run.out_dir>/previous/<time>/ (checkpoint.overwrite=true)")
    p.add_argument("--allow-config-change", metavar="KEY,...",
                   help="with --resume: accept these changes of keys that change the model or the objective "
                        "(model.*, loss.*, train.batch_size, ...; a section wildcard such as loss.* allowed); "
                        "checkpoint.allow_config_change")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    add_dry_run_arguments(p, "run")
    p.add_argument("--world-size", type=int, default=1,
                   help="--dry-run: ranks the run will have (each rank one device; default 1)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """`rgan train`, run inside torchelastic's `record` (imported here: it pulls in torch, and `rgan train
    --help` should stay instant). Bad input passes `record` as a value and is raised outside it, so torchrun's
    failure summary shows the exit code and the rank's one line, not a traceback of a usage error."""
    from torch.distributed.elastic.multiprocessing.errors import record

    outcome = record(_usage_errors_as_values)(args)
    if isinstance(outcome, UsageError):
        raise outcome
    return outcome


def _usage_errors_as_values(args: argparse.Namespace) -> int | UsageError:
    try:
        return _run(args)
    except UsageError as e:
        return e


def _run(args: argparse.Namespace) -> int:
    if args.help_config:
        for key, default, text in describe_keys():
            print(f"{key:28s} {default!r:22s} {text}")
        return 0
    if not args.config:
        raise UsageError("--config FILE is required (e.g. configs/demo.yaml or configs/paper/cifar10.yaml)")
    check_dry_run_arguments(args)
    if args.world_size != 1 and not args.dry_run:
        raise UsageError("--world-size only plans a --dry-run; the launcher (torchrun, deepspeed) sets a run's ranks")
    overrides = list(args.overrides)
    if args.resume and args.overwrite:
        raise UsageError(f"--resume {args.resume} continues the run in the folder, --overwrite sets it aside: "
                         "pass one of them")
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    if args.allow_config_change:
        if not args.resume:
            raise UsageError("--allow-config-change only goes with --resume auto|PATH: a fresh run has no "
                             "checkpoint config to differ from")
        keys = [k.strip() for k in args.allow_config_change.split(",") if k.strip()]
        overrides.append(f"checkpoint.allow_config_change={json.dumps(keys)}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    if args.dry_run:
        from rgan_dist.estimate import estimate_run, format_run

        est = estimate_run(cfg, ranks=args.world_size, step_time=args.step_time)
        print(json.dumps(est.to_dict(), indent=1) if args.json else "\n".join(format_run(est)))
        return 0
    return _train(cfg)


def add_dry_run_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """`--dry-run`, `--step-time`, `--json`: the cost estimate (`rgan_dist.estimate`), shared by train and sweep."""
    p.add_argument("--dry-run", action="store_true",
                   help=f"estimate the {what}'s wall time, device-hours, img/s and data volume from a few measured "
                        "steps on this machine, then exit (nothing trained or written)")
    p.add_argument("--step-time", type=float, metavar="SECONDS",
                   help="--dry-run: seconds per generator step to use instead of measuring")
    p.add_argument("--json", action="store_true", help="--dry-run: print the estimate as JSON")


def check_dry_run_arguments(args: argparse.Namespace) -> None:
    if not args.dry_run and (args.step_time is not None or args.json):
        raise UsageError(f"{'--step-time' if args.step_time is not None else '--json'} only goes with --dry-run")


def _train(cfg) -> int:
    from rgan_dist.engine.loop import TrainingDiverged, train
    from rgan_dist.parent_watch import launched, watch_parent
    from rgan_dist.tracking_spool import incomplete_note

    if launched(os.environ):  # a SIGKILLed torchrun agent must not leave its workers training unsupervised
        watch_parent(grace_s=cfg.dist.timeout_s + 600, what="the launcher (torchrun agent)")
    try:
        result = train(cfg)
    except TrainingDiverged as e:
        print(f"rgan train: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a rank that stalled or died: say which, not a Gloo traceback on a healthy rank
        from rgan_dist.peer_check import collective_failure_line, is_collective_failure

        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if not is_collective_failure(e, world):
            raise
        line = collective_failure_line(e, rank=rank, world_size=world, timeout_s=cfg.dist.timeout_s, env=os.environ)
        print(f"rgan train: error: {line}", file=sys.stderr, flush=True)
        return 1
    if result.out_dir and result.checkpoint is not None:
        print(f"rgan: {'stopped' if result.interrupted else 'finished'} at step {result.step} in "
              f"{result.seconds:.0f}s; checkpoint {result.checkpoint}")
        if result.samples:
            print(f"rgan: samples {result.samples[-1]} (all in {result.samples[-1].parent})")
        print(f"rgan: metrics {Path(result.out_dir) / 'metrics.jsonl'}")
    if result.out_dir and (note := incomplete_note(result.out_dir)):
        print(f"rgan: {note}")
    return 130 if result.interrupted else 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override any key of configs/demo.yaml, e.g. train.steps=300")


def run_demo(args: argparse.Namespace) -> int:
    from launcher.cli import CONFIGS

    demo = CONFIGS / "demo.yaml"
    if not demo.is_file():
        raise UsageError(f"{demo} is missing: run rgan demo from a source checkout (pip install -e .)")
    # The demo is re-run as is: each run starts afresh and the last one's files move to
    # runs/demo/previous/<time>/ (the run says where); `checkpoint.resume=auto` continues it instead.
    return _train(load_config(demo, ["checkpoint.overwrite=true", *args.overrides]))
