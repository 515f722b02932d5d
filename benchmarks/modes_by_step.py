"""Where a Stacked-Digits generator's KL comes from, checkpoint by checkpoint: each checkpoint scored exactly as
`rgan generate --checkpoint CKPT --num 26000` then `rgan modes` score it (the EMA generator, latents of seeds
0..25,999, the same classifier), with the KL split into each channel's digit KL and the KL between channels
(`rgan_dist.metrics.modes.decompose`). Used to ask whether a run's KL is still falling, and whether it is the
digits' shares (fixable by training on) or the channels' ties.

    python benchmarks/modes_by_step.py RUN/checkpoints/ckpt-*.pt --label recipe-seed0 --out results.json

Several invocations may append to one --out file (records are keyed by label and step; a rerun replaces).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rgan_dist.errors import UsageError  # noqa: E402
from rgan_dist.export import TrainedGenerator, generate, latents, load_trained  # noqa: E402
from rgan_dist.metrics.modes import DEFAULT_NUM_SAMPLES, score  # noqa: E402
from rgan_dist.samples import to_uint8  # noqa: E402

_CHUNK = 2000


def generated(trained: TrainedGenerator, num: int = DEFAULT_NUM_SAMPLES) -> Iterator[np.ndarray]:
    """The images `rgan generate --num num` writes (uint8 [n, R, R, 3], latents of seeds 0..num-1), in chunks,
    so 26k images never sit in memory as floats at once."""
    for start in range(0, num, _CHUNK):
        z = latents(range(start, min(start + _CHUNK, num)), trained.z_dim)
        yield to_uint8(generate(trained.module, z, 500)).permute(0, 2, 3, 1).numpy()


def score_checkpoint(path: Path, num: int = DEFAULT_NUM_SAMPLES) -> dict[str, Any]:
    """The `rgan modes` record of `rgan generate --num num` of the checkpoint, plus its step."""
    trained = load_trained(path)
    record = score(generated(trained, num), num_samples=num)
    return {"step": int(trained.metadata["step"]), "checkpoint": str(path), **record}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--label", required=True, help="the run's name in the output (e.g. recipe-seed0)")
    p.add_argument("--num", type=int, default=DEFAULT_NUM_SAMPLES)
    p.add_argument("--out", type=Path, required=True, help="JSON file to add the records to")
    a = p.parse_args(argv)
    if a.num < 1:
        p.error(f"--num {a.num}: must be >= 1 (26000 is the StackedMNIST protocol)")
    done = json.loads(a.out.read_text()) if a.out.is_file() else {"runs": {}}
    runs = done["runs"].setdefault(a.label, {})
    for path in a.checkpoints:
        try:
            rec = score_checkpoint(path, a.num)
        except UsageError as e:  # a missing or foreign checkpoint: one line; the records so far are kept
            p.exit(2, f"{p.prog}: error: {e}\n")
        runs[str(rec["step"])] = rec
        split = ", ".join(f"{v:.3f}" for v in rec["modes_kl_channels"])
        print(f"{a.label} step {rec['step']}: modes {rec['modes']:.0f} kl {rec['modes_kl']:.4f} "
              f"(channels {split}; between {rec['modes_kl_between']:.4f})", flush=True)
        a.out.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
