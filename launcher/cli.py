"""`rgan`: the one command-line entry point. Thin: it parses, validates and calls the library.

Each subcommand lives in the module that owns its concept and is imported only when chosen, so
`rgan --help` stays instant (DeepSpeed and Ray take seconds to import). Bad input anywhere surfaces as
a `UsageError` (the library's, `ConfigError` included) or a `DataError` (the data pipeline's);
`run_command` is the one place either becomes one line on stderr and exit code 2, never a traceback.
Every subcommand goes through it, whether started as `rgan COMMAND` or as `python -m launcher.X`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from data_pipeline.errors import DataError
from rgan_dist.errors import UsageError

# What a user can fix: the library's UsageError (ConfigError is one) and the data pipeline's DataError.
USER_ERRORS: tuple[type[Exception], ...] = (UsageError, DataError)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# name -> (help, "module:add_arguments", "module:run")
COMMANDS: dict[str, tuple[str, str, str]] = {
    "shards": ("pack image folders/archives into WebDataset shards + manifest",
               "data_pipeline.cli:add_shards_arguments", "data_pipeline.cli:run_shards"),
    "train": ("train a GAN from a YAML config (plain, torchrun or deepspeed launcher)",
              "launcher.train:add_arguments", "launcher.train:run"),
    "demo": ("end-to-end RaSGAN on the embedded digits, CPU-friendly",
             "launcher.train:add_demo_arguments", "launcher.train:run_demo"),
    "fid": ("FID/KID between two image folders or shard sets",
            "rgan_dist.metrics.cli:add_fid_arguments", "rgan_dist.metrics.cli:run_fid"),
    "modes": ("Stacked-Digits modes covered (of 1000) and KL to uniform of an image folder or shard set",
              "rgan_dist.metrics.cli:add_modes_arguments", "rgan_dist.metrics.cli:run_modes"),
    "eval": ("FID/KID of a checkpoint's generator against its training data",
             "launcher.evaluate:add_arguments", "launcher.evaluate:run"),
    "report": ("paper-style table and FID plots of an MLflow experiment",
               "launcher.report:add_arguments", "launcher.report:run"),
    "generate": ("PNGs (one per seed, a grid, or an interpolation strip/GIF) from a checkpoint's generator",
                 "launcher.generate:add_arguments", "launcher.generate:run"),
    "export": ("the generator alone (EMA, BatchNorm recalibrated) as safetensors or TorchScript, with its config",
               "launcher.generate:add_export_arguments", "launcher.generate:run_export"),
    "sweep": ("Ray Tune sweep over loss variants and hyperparameters (the script `ray submit` runs)",
              "launcher.sweep:add_arguments", "launcher.sweep:run"),
}


def _load(ref: str) -> Callable:
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgan", description="Relativistic GANs at scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (help_text, add_ref, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen command's module is imported
            _load(add_ref)(p)
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher puts `--local_rank=N` before our subcommand; ranks come from the
    environment (LOCAL_RANK) anyway, so the flag is dropped wherever it appears."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def run_command(prog: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, *,
                interrupted: str = "interrupted") -> int:
    """Run one subcommand and turn what the user can fix into `PROG: error: MESSAGE` and exit code 2.

    The only CLI error handler: `main` and each module's `python -m` entry call it, so the wording and
    exit codes cannot drift apart. Ctrl-C is exit 130 with `PROG: <interrupted>` (a command may add how
    to continue). Anything else is a bug and keeps its traceback.
    """
    try:
        return int(run(args) or 0)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    run_ref = COMMANDS[args.command][2]
    return run_command(f"rgan {args.command}", lambda a: _load(run_ref)(a), args)  # import errors handled too


if __name__ == "__main__":
    sys.exit(main())
