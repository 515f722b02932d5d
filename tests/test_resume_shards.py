"""Exact resume from WebDataset shards (the reader users train from), on 1 and 2 ranks, with DataLoader
workers; and a SIGTERM to one rank of a 2-rank job.

The shard set is tiny on purpose (24 images in 3 shards of 8) so that a few steps cross epoch
boundaries: with batch 4 and two real batches per step (rasgan: one for D, a fresh one for G), an epoch
is 3 steps on one rank and 1.5 steps on two. Every run is "8 steps straight" against "4 steps, then
resume to 8" (or "stopped by SIGTERM at 5, then resume to 8"), so each resume point lies mid-epoch and
the runs cross epoch boundaries before and after it; the final states must be bitwise equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DEMO
from jobs import JOB, assert_ranks_identical, assert_same_training_state, ckpt, job_env, ok, torchrun

from rgan_dist.checkpoint import CheckpointManager, load_checkpoint
from rgan_dist.config import load_config
from rgan_dist.data import load_digits_uint8
from rgan_dist.engine.faults import FAULT_ENV, parse_faults
from rgan_dist.engine.loop import train

IMAGES, SHARD_SIZE, STEPS = 24, 8, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 of scikit-learn's digits as PNG files, written to 3 shards by the project's writer."""
    from PIL import Image

    from data_pipeline.writer import write_shards

    root = tmp_path_factory.mktemp("shards")
    (root / "png").mkdir()
    for i, img in enumerate(load_digits_uint8(16, channels=1)[:IMAGES, 0].numpy()):
        Image.fromarray(img).save(root / "png" / f"{i:03d}.png")
    manifest = write_shards([str(root / "png")], root / "wds", 16, fmt="png", shard_size=SHARD_SIZE, progress=False)
    assert manifest["num_samples"] == IMAGES and len(manifest["shards"]) == IMAGES // SHARD_SIZE
    return root / "wds"


def overrides(shards: Path) -> list[str]:
    return [f"data.shards={shards}", "model.channels=3", "data.workers=2", "checkpoint.every=0"]


@pytest.mark.slow
def test_exact_resume_from_shards_one_rank(tmp_path, shards):
    def run(out: str, steps: int, *extra: str):
        return train(load_config(DEMO, [*JOB, *overrides(shards), f"run.out_dir={tmp_path / out}",
                                        f"train.steps={steps}", *extra]))

    straight = run("a", STEPS)
    half = run("b", STEPS // 2)
    resumed = run("b", STEPS, "checkpoint.resume=auto")
    assert resumed.step == STEPS
    # 6 batches per epoch, 2 per step: the resume point (batch 8) is mid-epoch 1, the end in epoch 2.
    assert load_checkpoint(half.checkpoint)["data"]["epoch"] == 1
    assert load_checkpoint(half.checkpoint)["data"]["batch"] == 2
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert (a["data"]["epoch"], a["data"]["batch"], a["data"]["workers"]) == (2, 4, 2)
    assert_same_training_state(a, b)


@pytest.fixture(scope="module")
def straight_two_ranks(tmp_path_factory, shards) -> dict:
    """The reference for the 2-rank tests: 8 steps without a stop."""
    out = tmp_path_factory.mktemp("straight")
    ok(torchrun(out, "dist.strategy=ddp", *overrides(shards), f"train.steps={STEPS}"))
    state = ckpt(out, STEPS)
    assert_ranks_identical(state, world=2)
    # 3 batches per epoch and rank, 2 per step: 16 batches end in epoch 5.
    assert [(r["data"]["epoch"], r["data"]["batch"]) for r in state["ranks"]] == [(5, 1), (5, 1)]
    return state


@pytest.mark.slow
@pytest.mark.timeout(600)  # > its jobs' own timeouts: 3 x 180 s with the module's reference run
def test_exact_resume_from_shards_two_ranks(tmp_path, shards, straight_two_ranks):
    ok(torchrun(tmp_path, "dist.strategy=ddp", *overrides(shards), f"train.steps={STEPS // 2}"))
    half = ckpt(tmp_path, STEPS // 2)
    assert [(r["data"]["epoch"], r["data"]["batch"]) for r in half["ranks"]] == [(2, 2), (2, 2)]  # mid-epoch
    resumed = ok(torchrun(tmp_path, "dist.strategy=ddp", *overrides(shards), f"train.steps={STEPS}",
                          "--resume", "auto"))
    assert f"at step {STEPS // 2}" in resumed
    assert_same_training_state(straight_two_ranks, ckpt(tmp_path, STEPS))


def test_term_fault_spec():
    assert [(f.action, f.step, f.rank) for f in parse_faults("term@5:rank1")] == [("term", 5, 1)]


@pytest.mark.slow
@pytest.mark.timeout(420)  # > its jobs' own timeouts: 2 x 180 s with the module's reference run
def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_resumes_exactly(tmp_path, shards, straight_two_ranks):
    """A real SIGTERM, sent by rank 1 to itself at the end of step 5 (the fault hook), reaches rank 1
    only: the ranks agree to stop after that same step and write one final checkpoint together."""
    stop = 5
    # A short collective timeout: ranks that failed to agree would otherwise wait the default 10 minutes.
    proc = torchrun(tmp_path, "dist.strategy=ddp", *overrides(shards), f"train.steps={STEPS}", "dist.timeout_s=30",
                    env=job_env(**{FAULT_ENV: f"term@{stop}:rank1"}))
    assert proc.returncode != 0, "an interrupted run must not report success"  # rgan train exits 130
    assert f"term at step {stop} on rank 1" in proc.stdout
    assert f"interrupted at step {stop}; saving a final checkpoint" in proc.stdout
    assert f"stopped at step {stop}" in proc.stdout
    latest = CheckpointManager(tmp_path / "checkpoints").latest()
    assert latest is not None and latest.name == f"ckpt-{stop:08d}.pt"
    final = load_checkpoint(latest)
    assert final["step"] == stop
    assert_ranks_identical(final, world=2)
    # Each rank recorded its own data position when the checkpoint was gathered: both consumed exactly
    # the 10 batches of 5 steps (epoch 3, batch 1 at 3 batches per epoch), so both stopped after step 5.
    assert [(r["data"]["epoch"], r["data"]["batch"]) for r in final["ranks"]] == [(3, 1), (3, 1)]
    resumed = ok(torchrun(tmp_path, "dist.strategy=ddp", *overrides(shards), f"train.steps={STEPS}",
                          "--resume", "auto"))
    assert f"at step {stop}" in resumed
    assert_same_training_state(straight_two_ranks, ckpt(tmp_path, STEPS))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_skipped_samples_of_a_truncated_shard_are_counted_on_every_rank(tmp_path, shards):
    """A shard cut mid-file: training goes on, and `skipped_samples` is the job's count (the sum over
    ranks of the samples each could not read), not 0 and not rank 0's alone."""
    import json
    import shutil

    from data_pipeline.verify import iter_shard_samples

    data = tmp_path / "wds"
    shutil.copytree(shards, data)
    tar = data / "data-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    readable = 0
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the tar reader says, it stops
        for _ in iter_shard_samples(str(tar)):
            readable += 1
    lost = SHARD_SIZE - readable
    ok(torchrun(tmp_path, "dist.strategy=ddp", *overrides(data), f"train.steps={STEPS}"))
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    per_rank = [r["data"]["skipped"] for r in ckpt(tmp_path, STEPS)["ranks"]]
    assert last["step"] == STEPS and last["skipped_samples"] == sum(per_rank)
    assert all(n > 0 for n in per_rank), per_rank  # both ranks read the cut shard in these 6 epochs
    # 16 batches per rank: epochs 0-4 whole (3 batches each), and epoch 5 begun, each losing `lost` samples.
    assert 5 * lost <= sum(per_rank) <= 6 * lost
