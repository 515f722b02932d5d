"""`rgan report --experiment NAME`: the experiment's runs as a markdown table and FID plots (rgan_dist.report)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    p.add_argument("--out", help="output folder (default: report-<experiment>)")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///mlflow.db in the working directory)")


def run(args: argparse.Namespace) -> int:
    from rgan_dist.report import header, markdown_table, write_report

    out = args.out or f"report-{args.experiment}"
    paths, runs = write_report(args.experiment, out, args.tracking_uri)
    print(header(args.experiment, runs).replace("\n\n", "\n") + "\n")
    print(markdown_table(runs))
    print(f"\nrgan report: {paths['markdown']}, {paths['fid_vs_step']}, {paths['fid_vs_time']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.report ...`, the same as `rgan report ...`."""
    from launcher.cli import run_command

    p = argparse.ArgumentParser(prog="rgan report", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_command("rgan report", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
