"""Is a Stacked-Digits generator's digit skew its own, or the classifier's? Reads every channel of the
checkpoint's `rgan generate --num 26000` images twice: with the `rgan modes` classifier (an RBF SVC) and
with a k-nearest-neighbour vote over sklearn's 1,797 real digits in the same 8x8 feature space. Two
classifiers of different kinds that agree on the skew (the same digits drawn too often or too rarely) put
it in the generator; a skew only the SVC sees would be the SVC's. Their agreement per channel also says how
many generated digits are ambiguous: on real digits the SVC reads 99.6% right (held out) and a 5-NN vote
98.9% (leave-one-out).

    python benchmarks/modes_crosscheck.py RUN/checkpoints/ckpt-00007000.pt --out crosscheck.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.modes_by_step import generated  # noqa: E402
from rgan_dist.errors import UsageError  # noqa: E402
from rgan_dist.export import load_trained  # noqa: E402
from rgan_dist.metrics.modes import DEFAULT_NUM_SAMPLES, channel_features, load_classifier  # noqa: E402


def knn_reader(resolution: int, k: int):
    """A k-NN digit reader over the real digits, in the SVC's features (each digit round-tripped through a
    R x R stack, as `fit_classifier` does). Ties go to the nearest neighbour's label."""
    import torch

    from data_pipeline.sources import digits_arrays, stack_digits

    images, labels = digits_arrays()
    stacks = np.stack([stack_digits(d, d, d, resolution=resolution) for d in images])
    real = torch.from_numpy(channel_features(stacks, resolution)[0::3]).float()

    def read(feats: np.ndarray) -> np.ndarray:
        idx = torch.cdist(torch.from_numpy(feats).float(), real).topk(k, largest=False).indices.numpy()
        votes = labels[idx]  # [n, k], nearest first
        counts = np.stack([(votes == d).sum(1) for d in range(10)], axis=1)
        rows = np.arange(len(votes))[:, None]
        winning = counts[rows, votes] == counts.max(1, keepdims=True)  # [n, k]: neighbours of a top digit
        return votes[rows[:, 0], winning.argmax(1)]  # the nearest of them

    return read


def crosscheck(path: Path, num: int = DEFAULT_NUM_SAMPLES, k: int = 5) -> dict[str, Any]:
    """Per channel: the digit shares by the SVC and by k-NN, and how often the two agree."""
    trained = load_trained(path)
    resolution = int(trained.metadata["resolution"])
    svc, knn = load_classifier(resolution), knn_reader(resolution, k)
    a, b = [], []
    for images in generated(trained, num):
        feats = channel_features(images, resolution)
        a.append(svc.model.predict(feats).astype(np.int64))
        b.append(knn(feats))
    by_svc, by_knn = (np.concatenate(v).reshape(-1, 3) for v in (a, b))

    def shares(d: np.ndarray) -> list[list[float]]:
        return [(np.bincount(d[:, c], minlength=10) / len(d)).round(4).tolist() for c in range(3)]

    return {"checkpoint": str(path), "step": int(trained.metadata["step"]), "num": num, "k": k,
            "svc_shares": shares(by_svc), "knn_shares": shares(by_knn),
            "agreement": [float((by_svc[:, c] == by_knn[:, c]).mean()) for c in range(3)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--num", type=int, default=DEFAULT_NUM_SAMPLES)
    p.add_argument("--k", type=int, default=5, help="neighbours per vote (default 5)")
    p.add_argument("--out", type=Path, help="JSON file to write the record to")
    a = p.parse_args(argv)
    if a.num < 1 or a.k < 1:
        p.error(f"--num {a.num} --k {a.k}: both must be >= 1")
    try:
        rec = crosscheck(a.checkpoint, a.num, a.k)
    except UsageError as e:  # a missing or foreign checkpoint: one line
        p.exit(2, f"{p.prog}: error: {e}\n")
    for c, name in enumerate("RGB"):
        print(f"{name}: svc  " + " ".join(f"{100 * v:4.1f}" for v in rec["svc_shares"][c]))
        print(f"{name}: {a.k}-nn " + " ".join(f"{100 * v:4.1f}" for v in rec["knn_shares"][c])
              + f"   agree {100 * rec['agreement'][c]:.1f}%")
    if a.out:
        a.out.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
