"""The best `modes_kl` a generator of a Stacked-Digits training set can score: the KL of N = 26,000 samples
drawn from the training set's own mode histogram (a generator that reproduced its training stacks exactly),
beside N samples of the uniform distribution (what the protocol's "real stacks" score). A finite training set
is not uniform over the 1000 modes (its histogram has KL ~ 999 / (2 count)), so the floor is about the sum of
the two; a KL target below the floor of the training set's size cannot be met, whatever the GAN.

Labels only (no images, no classifier): `data_pipeline.sources.stacked_indices` is the draw `rgan shards
sklearn:stacked-digits --count C --seed S` packs, so this is exact for those shards.

    python benchmarks/modes_floor.py --out benchmarks/results/modes_floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.sources import digits_arrays, stacked_indices  # noqa: E402
from rgan_dist.metrics.modes import NUM_MODES, summarize  # noqa: E402


def stacked_labels(count: int, seed: int) -> np.ndarray:
    """The mode (100 r + 10 g + b) of every stack of `rgan shards sklearn:stacked-digits --count --seed`."""
    digit = digits_arrays()[1][stacked_indices(count, seed)]
    return digit[:, 0] * 100 + digit[:, 1] * 10 + digit[:, 2]


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="10000,20000,50000,100000", help="training-set sizes")
    ap.add_argument("--data-seeds", default="0,2026")
    ap.add_argument("--samples", type=int, default=26_000, help="N of the protocol")
    ap.add_argument("--draws", type=int, default=10, help="resamples per value (the spread)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    uniform = [summarize(np.bincount(rng.integers(0, NUM_MODES, a.samples), minlength=NUM_MODES))["modes_kl"]
               for _ in range(a.draws)]
    for count in (int(c) for c in a.counts.split(",")):
        for seed in (int(s) for s in a.data_seeds.split(",")):
            labels = stacked_labels(count, seed)
            train = summarize(np.bincount(labels, minlength=NUM_MODES))
            floor = [summarize(np.bincount(rng.choice(labels, a.samples), minlength=NUM_MODES))["modes_kl"]
                     for _ in range(a.draws)]
            rows.append({"count": count, "data_seed": seed, "train_modes": train["modes"],
                         "train_kl": train["modes_kl"], "floor_kl": spread(floor)})
            print(f"count {count:>7,} seed {seed:>4}: training set KL {train['modes_kl']:.4f}, "
                  f"{a.samples:,} samples of it KL {np.mean(floor):.4f} ({min(floor):.4f}..{max(floor):.4f})")
    print(f"{a.samples:,} uniform samples: KL {np.mean(uniform):.4f} ({min(uniform):.4f}..{max(uniform):.4f})")
    result = {"samples": a.samples, "draws": a.draws, "uniform_kl": spread(uniform), "rows": rows}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
