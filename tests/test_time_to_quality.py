"""benchmarks/time_to_quality.py: its own logic (budget points, the budget loop, time to target, seed
spread, targets, the table) on small made-up inputs, and the smoke profile end to end (slow, ~60 s on a
2-core CPU): real Stacked-Digits shards, two variants x two seeds through the project's Trainer, the
`modes` metric, MLflow parent and child runs, and a rerun that skips what finished."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "time_to_quality.py"
_spec = importlib.util.spec_from_file_location("time_to_quality", SCRIPT)
assert _spec is not None and _spec.loader is not None
ttq = importlib.util.module_from_spec(_spec)
sys.modules["time_to_quality"] = ttq  # dataclasses look their module up by name
_spec.loader.exec_module(ttq)


def test_budget_points_are_fractions_of_the_budget_ending_at_it():
    assert ttq.budget_points(200, [0.25, 0.5, 0.75, 1.0]) == [50, 100, 150, 200]
    assert ttq.budget_points(100, [0.5, 0.1, 0.5]) == [10, 50, 100]  # sorted, deduplicated, 1.0 added
    for budget, fractions in ((0, [1.0]), (-5, [1.0]), (math.inf, [1.0]), (10, [0.0, 1.0]), (10, [1.5]), (10, [])):
        with pytest.raises(ValueError):
            ttq.budget_points(budget, fractions)


def test_train_until_times_only_the_steps_and_stops_at_the_first_step_past_the_target():
    now = [0.0]
    calls = []

    def clock() -> float:
        return now[0]

    def step() -> None:
        calls.append(now[0])
        now[0] += 0.3  # a step costs 0.3 s of the clock

    spent, n = ttq.train_until(step, clock, 0.0, 1.0)
    assert n == 4 and math.isclose(spent, 1.2)  # 0.9 < 1.0, so a 4th step; overshoot under one step
    now[0] += 100.0  # time between the calls (an evaluation) is not charged
    spent, n = ttq.train_until(step, clock, spent, 2.0)
    assert n == 3 and math.isclose(spent, 2.1)
    assert ttq.train_until(step, clock, 2.1, 2.0) == (2.1, 0)


def _points(values, key="modes"):
    return [{"fraction": (i + 1) / len(values), "spent_s": 10.0 * (i + 1), "step": 5 * (i + 1),
             "metrics": {} if v is None else {key: v}} for i, v in enumerate(values)]


def test_time_to_target_is_the_first_point_that_meets_it():
    assert ttq.time_to_target(_points([100, 850, 920, 990]), "modes", 900, True) == 30.0
    assert ttq.time_to_target(_points([100, 850]), "modes", 900, True) is None
    assert ttq.time_to_target(_points([None, 950]), "modes", 900, True) == 20.0  # a missing value never meets it
    assert ttq.time_to_target(_points([80.0, 41.0, 39.0], "fid"), "fid", 40.0, False) == 30.0
    assert ttq.time_to_target(_points([float("nan"), 30.0], "fid"), "fid", 40.0, False) == 20.0


def test_spread_is_mean_min_max_n_of_the_finite_values():
    assert ttq.spread([3, 1, 2]) == (2.0, 1.0, 3.0, 3)
    assert ttq.spread([None, 4.0, float("nan"), 6.0]) == (5.0, 4.0, 6.0, 2)
    assert ttq.spread([None]) is None and ttq.spread([]) is None


def _run(variant, seed, values, key="modes", kl=None):
    points = _points(values, key)
    if kl is not None:
        points[-1]["metrics"]["modes_kl"] = kl
    return {"workload": "stacked" if key == "modes" else "emoji", "variant": variant,
            "label": ttq.VARIANTS[variant].label, "seed": seed, "outcome": "completed", "points": points,
            "settings": {"budgets": [10.0 * (i + 1) for i in range(len(values))], "clock": "process_cpu",
                         "threads": 1, "overrides": []},
            "config": {"model.resolution": 32, "model.arch": "dcgan", "model.width": 32, "train.batch_size": 64,
                       "eval.modes_samples": 26000, "eval.num_samples": 1000}}


def test_targets_are_numbers_or_a_variants_mean_final_value():
    runs = [_run("wgan-gp", 0, [50.0, 40.0], "fid"), _run("wgan-gp", 1, [60.0, 30.0], "fid"),
            _run("sgan", 0, [70.0, 20.0], "fid")]
    assert ttq.resolve_target("final:WGAN-GP", runs, "fid")[0] == 35.0
    assert ttq.resolve_target("42", runs, "fid")[0] == 42.0
    assert ttq.resolve_target("final:rasgan", runs, "fid") is None  # no such runs
    assert ttq.resolve_target(None, runs, "fid") is None
    for bad in ("final:nope", "fast"):
        with pytest.raises(ValueError):
            ttq.check_target(bad)


def test_variants_are_named_by_key_or_label_and_gp_variants_use_setup_2():
    assert ttq.variant_key("RaSGAN-GP") == ttq.variant_key("rasgan-gp") == "rasgan-gp"
    with pytest.raises(ValueError, match="unknown variant"):
        ttq.variant_key("dcgan")
    assert len(ttq.VARIANTS) == 20
    for key in ("sgan", "rsgan", "rasgan", "lsgan", "ralsgan", "hinge", "rahinge"):  # the paper's stable D
        assert {"loss.penalty=none", "model.spectral_norm=true", "model.d_batch_norm=false"} <= set(
            ttq.VARIANTS[key].overrides), key
        # the exact order too: stored runs' settings compare override lists, so a reorder breaks resuming
        assert ttq.VARIANTS[key].overrides == (f"loss.name={key}", "loss.penalty=none", "train.lr_g=2e-4",
                                               "train.lr_d=2e-4", "train.betas=[0.5, 0.999]", "train.n_dis=1",
                                               "model.spectral_norm=true", "model.d_batch_norm=false")
    for key in ("sgan-bn", "rasgan-bn"):  # the labelled extra rows keep DCGAN's BatchNorm D
        assert "model.d_batch_norm=true" in ttq.VARIANTS[key].overrides
        assert "BatchNorm" in ttq.VARIANTS[key].label
    for key in ("wgan-gp", "rsgan-gp", "rasgan-gp"):
        o = ttq.VARIANTS[key].overrides
        setup_2 = {"loss.penalty=wgan-gp", "train.lr_d=1e-4", "train.betas=[0.5, 0.9]", "model.d_batch_norm=false"}
        assert setup_2 <= set(o)
    assert "train.n_dis=5" in ttq.VARIANTS["wgan-gp"].overrides
    r3gan = {"loss.name=rsgan", "loss.penalty=r1+r2", "model.d_batch_norm=false"}
    assert r3gan <= set(ttq.VARIANTS["rpgan-r1r2"].overrides)


DATA = {"stacked": "data/s", "emoji": "data/e", "smalldata": "data/sd"}


def test_every_variant_and_profile_makes_a_valid_config():
    from rgan_dist.config import load_config

    for name, profile in ttq.PROFILES.items():
        workloads = ",".join(profile.workloads)
        for flags in ([], ["--variants", ",".join(ttq.VARIANTS), "--resolution", "64"]):  # the recipes are 64x64
            args = ttq.parse_args(["--profile", name, "--workloads", workloads, "--seeds", "0", *flags])
            specs = ttq.plan_runs(args, DATA, {"smalldata": "data/all"})
            assert {s.workload for s in specs} == set(profile.workloads)
            for spec in specs:
                cfg = load_config(ttq.CONFIG, spec.overrides)
                assert cfg.train.seed == spec.seed and cfg.eval.every > 0 and cfg.train.steps > 10**8, spec.name
                assert cfg.data.workers == 0 and cfg.checkpoint.every == 0 and cfg.run.device == profile.device


def test_recipe_variants_are_the_recipe_file_with_one_part_swapped():
    """The recipe is defined once, in configs/recipes/: a recipe run's config equals the recipe's on every
    method key (model, loss, optimiser, EMA, augmentation, schedules), the swapped part aside; the benchmark
    keeps its own data, resolution, metric, seed and budget."""
    from benchmarks.ttq.profiles import R3GAN_KEYS_OFF
    from benchmarks.ttq.recipe import HARNESS_KEYS, METHOD_SECTIONS
    from rgan_dist.config import load_config

    args = ttq.parse_args(["--profile", "cpu-long", "--variants", ",".join(k for k in ttq.VARIANTS if "recipe" in k),
                           "--seeds", "0"])
    specs = ttq.plan_runs(args, DATA, {"smalldata": "data/all"})
    swapped = {"recipe": {}, "recipe-dcgan": {"model.arch": "dcgan", "model.stage_widths": [], "model.stage_blocks": 2,
                                              "model.cardinality": 0, "model.expansion": 2},
               "recipe-r3gan": {"model.arch": "r3gan", "model.stage_widths": [128, 64, 32, 16],
                                "model.stage_blocks": 1},
               "recipe-rasgan": {"loss.name": "rasgan"}, "recipe-ralsgan": {"loss.name": "ralsgan"},
               "recipe-sgan": {"loss.name": "sgan"}, "recipe-noaug": {"augment.policy": [], "augment.p": 0.0}}
    # the architecture swaps run on their own recipe's workload only: r3gan on stacked (a DCGAN recipe), the
    # DCGAN on small data (an r3gan recipe); every other swap on both
    assert sorted((s.variant, s.workload) for s in specs) == sorted(
        [(v, w) for v in swapped for w in ("stacked", "smalldata")
         if (v, w) not in {("recipe-dcgan", "stacked"), ("recipe-r3gan", "smalldata")}])
    for spec in specs:
        got = load_config(ttq.CONFIG, spec.overrides).flat()
        recipe = load_config(ROOT / ttq.VARIANTS[spec.variant].recipes[spec.workload]).flat()
        want = {**recipe, **swapped[spec.variant]}
        method = [k for k in recipe if k.split(".")[0] in METHOD_SECTIONS and k not in HARNESS_KEYS]
        assert {k: got[k] for k in method} == {k: want[k] for k in method}, spec.name
        assert got["data.shards"] == DATA[spec.workload] and got["train.seed"] == 0
        if spec.workload == "smalldata":  # FID of the 2,011-image G against every image of the vendor
            assert got["eval.reference_data"] == "data/all" and got["eval.reference_samples"] >= 10**6
            assert got["eval.num_samples"] >= 2000 and got["model.resolution"] == 64
    defaults = load_config(None).flat()
    for o in R3GAN_KEYS_OFF:  # the values the recipe with another architecture sets are the defaults
        key = o.partition("=")[0]
        assert load_config(None, [o]).flat()[key] == defaults[key], o


def test_a_recipe_runs_at_another_resolution_from_its_own_file_there():
    """Small data at 32x32 (issue 21 allows it where 64x64 is too slow) runs configs/recipes/small_data_32.yaml,
    the 32x32 form of small_data.yaml (its widths are per stage), swaps included; a resolution with no such
    file is refused, naming the file to write."""
    from benchmarks.ttq.recipe import HARNESS_KEYS, METHOD_SECTIONS, recipe_for
    from rgan_dist.config import load_config

    assert recipe_for("configs/recipes/small_data.yaml", 32) == "configs/recipes/small_data_32.yaml"
    assert recipe_for("configs/recipes/small_data.yaml", 64) == "configs/recipes/small_data.yaml"
    args = ttq.parse_args(["--profile", "cpu-long", "--workloads", "smalldata", "--resolution", "32",
                           "--variants", "recipe,recipe-noaug", "--seeds", "0"])
    specs = ttq.plan_runs(args, DATA, {"smalldata": "data/all"})
    recipe = load_config(ROOT / "configs/recipes/small_data_32.yaml").flat()
    assert recipe["model.resolution"] == 32 and len(recipe["model.stage_widths"]) == 4  # 4x4 .. 32x32
    method = [k for k in recipe if k.split(".")[0] in METHOD_SECTIONS and k not in HARNESS_KEYS]
    for spec, swap in zip(specs, ({}, {"augment.policy": [], "augment.p": 0.0}), strict=True):
        got = load_config(ttq.CONFIG, spec.overrides).flat()
        assert got["model.resolution"] == 32
        assert {k: got[k] for k in method} == {k: {**recipe, **swap}[k] for k in method}, spec.name
    with pytest.raises(ValueError, match=r"is a 64x64 recipe; this workload runs at 128 .*small_data_128.yaml"):
        ttq.plan_runs(ttq.parse_args(["--profile", "cpu-long", "--workloads", "smalldata", "--resolution", "128",
                                      "--variants", "recipe", "--seeds", "0"]), DATA, {"smalldata": "data/all"})


@pytest.mark.parametrize("value", [5e-05, 2e-4, 0.1, 1e20, 3, 0, True, False, None, "adaptive", "rsgan", "r1+r2",
                                   "a, b", "", "true", "1e-4", [0.0, 0.99], [], ["flip", "rot90"], [128, 64]])
def test_override_values_read_back_as_the_same_value(value):
    from benchmarks.ttq.recipe import override_value
    from rgan_dist.config import parse_overrides

    got = parse_overrides([f"s.k={override_value(value)}"])["s.k"]
    assert got == value and type(got) is type(value)


def test_small_data_is_a_seeded_draw_of_exactly_2011_images_of_one_vendor(tmp_path, monkeypatch):
    from benchmarks.ttq import data

    vendor = tmp_path / "emoji" / "apple"
    (vendor / "sub").mkdir(parents=True)
    for i in range(2500):
        (vendor / ("sub" if i % 7 == 0 else "") / f"{i:04d}.png").write_bytes(b"x")
    (vendor / "notes.txt").write_text("not an image")
    (tmp_path / "emoji" / "twitter").mkdir()
    (tmp_path / "emoji" / "twitter" / "9999.png").write_bytes(b"x")
    files = data.image_files(vendor)
    assert len(files) == 2500
    a, b = data.draw_subset(files, 2011, 7), data.draw_subset(list(reversed(files)), 2011, 7)
    assert a == b and len(set(a)) == 2011  # the same seed, the same subset, whatever the listing order
    assert data.draw_subset(files, 2011, 8) != a
    with pytest.raises(ValueError, match="2011 images asked for, only 2000 there"):
        data.draw_subset(files[:2000], 2011, 7)

    made = []
    monkeypatch.setattr(data, "_shards", lambda dest, cmd, what: made.append(cmd) or str(dest))
    args = ttq.parse_args(["--profile", "cpu-long", "--workloads", "smalldata", "--out", str(tmp_path / "o"),
                           "--emoji-dir", str(tmp_path / "emoji")])
    shards, reference = data.prepare_data("smalldata", args, 64, 7)
    links = data.image_files(tmp_path / "o" / "data" / "smalldata-apple-n2011-s7-files")
    assert len(links) == 2011 and sorted(p.resolve() for p in links) == [p.resolve() for p in a]
    assert made[0][0] == str(vendor) and "smalldata-apple-n2011-s7" in shards  # reference: every apple image
    assert reference is not None and reference.endswith("emoji-apple-r64")


def test_the_data_seed_is_part_of_every_run_and_checked_on_resume(tmp_path):
    from benchmarks.ttq.results import Results

    args = ttq.parse_args(["--profile", "cpu-long", "--seeds", "0,1", "--out", str(tmp_path)])
    specs = ttq.plan_runs(args, DATA, {"smalldata": "data/all"})
    assert {s.data_seed for s in specs} == {ttq.PROFILES["cpu-long"].workloads["stacked"].data_seed} != {0}
    assert all(s.settings()["data_seed"] == s.data_seed for s in specs)
    # the one-seed rows (swaps, baselines) run on the first seed only
    assert {s.variant for s in specs if s.seed == 1 and s.workload == "stacked"} == {"recipe"}
    assert ttq.parse_args(["--profile", "cpu", "--data-seed", "4"]).workload_profiles["stacked"].data_seed == 4
    old = ttq.plan_runs(ttq.parse_args(["--profile", "cpu", "--seeds", "0", "--out", str(tmp_path)]), DATA)[0]
    assert old.data_seed == 0
    res = Results(tmp_path / "results.json")
    record = {"workload": old.workload, "variant": old.variant, "seed": old.seed, "settings": old.settings()}
    del record["settings"]["data_seed"]  # a record from before data seeds: made with seed 0
    res.runs.append(record)
    assert res.finished(old) is record
    other = ttq.plan_runs(ttq.parse_args(["--profile", "cpu", "--seeds", "0", "--data-seed", "3",
                                          "--out", str(tmp_path)]), DATA)[0]
    with pytest.raises(SystemExit):
        res.finished(other)


def test_table_has_a_row_per_seed_and_the_spread_per_variant():
    runs = [_run("sgan", 0, [100, 500, 800], kl=1.5), _run("sgan", 1, [300, 700, 950], kl=0.5),
            _run("rasgan", 0, [200, 910, 990], kl=0.1)]
    md = ttq.workload_section("stacked", runs, "900", "plot.png")
    assert "| SGAN | 0 | 100 | 500 | 800 | 1.50 | 15 | not reached |" in md
    assert "| RaSGAN | 0 | 200 | 910 | 990 | 0.10 | 15 | 20 s |" in md
    assert ("| SGAN | 2 | 200 (100..300) | 600 (500..700) | 875 (800..950) | 1.00 (0.50..1.50) "
            "| 1/2: 30 s (30 s..30 s) |") in md
    assert "Target: modes >= 900." in md and "![Stacked-Digits" in md and "; dcgan width 32, batch 64." in md
    recipe = _run("recipe", 0, [10, 20, 30], kl=1.0)
    recipe["config"] = {**recipe["config"], "model.arch": "r3gan", "model.stage_widths": [128, 64]}
    mixed = ttq.workload_section("stacked", [recipe, runs[0]], None, None)  # the model of each row, when they differ
    assert "; SGAN: dcgan width 32, batch 64; Recipe: r3gan stage widths [128, 64], batch 64. No target" in mixed
    assert "augment p" not in md and "augment p" not in mixed  # no run recorded one
    recipe["points"][-1]["augment_p"] = 0.73412
    augmented = ttq.workload_section("stacked", [recipe, runs[0]], None, None)
    assert "| modes_kl @ end | augment p @ end | G steps |" in augmented
    assert "| Recipe | 0 | 10 | 20 | 30 | 1.00 | 0.73 | 15 | - |" in augmented
    assert "| SGAN | 0 | 100 | 500 | 800 | 1.50 | - | 15 | - |" in augmented  # a record without p
    report = ttq.markdown_report({"invocations": [{"command": "python benchmarks/time_to_quality.py --profile cpu",
                                                   "machine": {"cpu": "X", "cpu_count": 2, "loadavg": [1.0]}}],
                                  "runs": runs}, {"stacked": "900"}, {"stacked": "p.png"})
    assert report.startswith("## Time to quality") and "--profile cpu" in report


def test_budget_step_tracker_logs_at_budget_seconds():
    seen = []

    class Inner:
        run_id = "r"

        def log_metrics(self, metrics, step, context=None):
            seen.append((metrics, step))

        def log_image(self, path, key, step):
            seen.append((key, step))

    t = ttq.BudgetStepTracker(Inner())
    t.budget_step = 150
    t.log_metrics({"modes": 3.0}, 4321)
    t.log_image("grid.png", "samples", 4321)  # sample grids on the same x-axis as the metrics
    assert seen == [({"modes": 3.0, "gen_step": 4321.0}, 150), ("samples", 150)] and t.run_id == "r"


@pytest.mark.parametrize("flags, message", [
    (["--variants", "sgan,nope"], "unknown variant 'nope'"),
    (["--points", "0,1"], "points must be fractions"),
    (["--seeds", "a"], "--seeds a: one or more integers"),
    (["--workloads", "cifar"], "unknown workload 'cifar'"),
    (["--target-fid", "fast"], "target 'fast'"),
    (["--set", "train.nope=1", "--dry-run"], "unknown key train.nope"),
    (["--workloads", "smalldata"], "--workloads smalldata: not in profile smoke"),
    (["--profile", "cpu", "--workloads", "emoji", "--variants", "recipe", "--resolution", "16", "--dry-run"],
     "is a 64x64 recipe"),
    (["--data-seed", "-1"], "--data-seed -1: must be >= 0"),
    (["--workloads", "emoji", "--variants", "recipe-r3gan"], "--variants recipe-r3gan: runs on stacked only"),
])
def test_bad_flags_give_one_line(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        ttq.main([*flags, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.timeout(540)  # > its jobs' own timeouts: 300 + 120 + 60 s
def test_smoke_profile_end_to_end_and_resume(tmp_path):
    """Two variants x two seeds of the smoke profile (measured ~55 s on the 2-core CPU), then the same
    command again: nothing reruns, the report is rebuilt."""
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--profile", "smoke", "--out", str(out), "--budget", "4",
           "--set", f"tracking.mlflow_uri=sqlite:///{db}", "--eval-samples", "1000", "--data-seed", "3",
           "--set", "augment.policy=[translation]", "--set", "augment.p=0.25"]  # p is recorded at each point
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["clock"] == "process_cpu" and data["invocations"][0]["machine"]["torch"]
    assert data["invocations"][0]["data_seeds"] == {"stacked": 3}  # the data seed, recorded with every run
    assert (out / "data" / "stacked-digits-r32-n2000-s3" / "manifest.json").is_file()
    runs = {(r["variant"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {("rsgan", 0), ("rsgan", 1), ("rasgan-gp", 0), ("rasgan-gp", 1)}
    for r in runs.values():
        assert r["outcome"] == "completed" and [p["budget_s"] for p in r["points"]] == [2.0, 4.0]
        assert r["data_seed"] == r["settings"]["data_seed"] == 3
        assert all(p["spent_s"] >= p["budget_s"] and 0 <= p["metrics"]["modes"] <= 1000 for p in r["points"])
        assert r["points"][1]["step"] > r["points"][0]["step"] > 0 and r["config"]["eval.metrics"] == ["modes"]
        assert [p["augment_p"] for p in r["points"]] == [0.25, 0.25]
    # RaSGAN-GP runs setup 2 and costs more per step: fewer G steps in the same budget
    assert runs[("rasgan-gp", 0)]["config"]["train.lr_d"] == 1e-4
    md = (out / "results.md").read_text()
    assert md.count("| RSGAN | ") == 3 and md.count("| RaSGAN-GP | ") == 3  # 2 seeds + the per-variant row
    assert (out / "time_to_quality_stacked.png").stat().st_size > 10_000
    from PIL import Image  # every run's last grid (4 runs, 3 to a row), each under its caption

    with Image.open(out / "time_to_quality_stacked_samples.jpg") as sheet:
        assert sheet.width > 3 * 200 and sheet.height > 2 * 200, sheet.size

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("time-to-quality")
    parent = data["mlflow"]["parent_run_id"]
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    history = client.get_metric_history(children[0].info.run_id, "eval/modes")
    assert sorted(m.step for m in history) == [2, 4]  # step = budget seconds
    assert client.get_run(parent).info.status == "FINISHED"

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already finished" in again.stdout and "started" not in again.stdout
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 4
    (out / "results.md").unlink()
    only = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)
    assert only.returncode == 0 and (out / "results.md").read_text() == md
