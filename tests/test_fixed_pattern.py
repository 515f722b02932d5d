"""benchmarks/fixed_pattern.py: the leak detector behind issue 21's 6b reading. It must score content that
moves from image to image as smooth and a stroke at one place as sharp, read real images from shards, and
fail on bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import fixed_pattern as FP

R = 16


def discs(n: int, seed: int, stroke: float = 0.0) -> np.ndarray:
    """uint8 [n, R, R, 3]: a dark disc of radius 3 at a random place on white; in a `stroke` share of them
    also a dark vertical line at column 13, rows 3..12 (what a leaking G drew)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:R, :R]
    out = np.full((n, R, R, 3), 255, np.uint8)
    for i in range(n):
        cy, cx = rng.integers(3, R - 3, 2)
        out[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 9] = (40, 60, 200)
        if rng.random() < stroke:
            out[i, 3:13, 13] = 20
    return out


def test_a_stroke_at_one_place_is_sharp_in_the_average_and_moving_content_is_not():
    smooth = FP.sharpness(FP.mean_luminance([discs(400, 0)[:200], discs(400, 0)[200:]])[0])
    leaked = FP.sharpness(FP.mean_luminance([discs(400, 0, stroke=0.9)])[0])
    assert smooth["max_step"] < 0.12
    # the stroke is ~0.9 of the way from white to ink on one column of the average: a step of ~0.75
    assert leaked["max_step"] > 0.5 > smooth["max_step"] * 4
    assert leaked["p99_step"] > smooth["p99_step"]
    mean, n = FP.mean_luminance([discs(3, 1), discs(2, 2)])
    assert n == 5 and mean.shape == (R, R) and 0.0 <= mean.min() <= mean.max() <= 1.0


def test_the_cli_scores_real_images_from_shards_and_writes_the_average_images(tmp_path, capsys):
    from PIL import Image

    from data_pipeline.writer import write_shards

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(discs(30, 3, stroke=1.0)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    shards = tmp_path / "shards"
    write_shards([str(folder)], shards, R, fmt="png", shard_size=10, shuffle=False, progress=False)
    out, png = tmp_path / "fp.json", tmp_path / "means.png"
    assert FP.main(["--reference", str(shards), "--num", "25", "--out", str(out), "--png", str(png)]) == 0
    rec = json.loads(out.read_text())["records"]["real"]
    assert rec["images"] == 25 and rec["max_step"] > 0.5  # every image carries the stroke
    assert Image.open(png).size[0] >= R * 4
    assert "real" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--run", "no-equals-sign"], "expected NAME=CHECKPOINT"),
    (["--run", "x=/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    ([], "nothing to score"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        FP.main([*args, "--out", str(tmp_path / "fp.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_records_of_earlier_invocations_are_kept(tmp_path):
    out = tmp_path / "fp.json"
    out.write_text(json.dumps({"records": {"earlier": {"images": 1, "max_step": 0.1}}}))
    with pytest.raises(SystemExit):
        FP.main(["--run", "x=/nonexistent/ckpt.pt", "--out", str(out)])
    assert "earlier" in json.loads(Path(out).read_text())["records"]
