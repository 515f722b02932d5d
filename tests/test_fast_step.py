"""The cheaper D/G step against the plain one: fused Adam, which D gets one concatenated forward, and
`train.compile` (compiled vs eager losses and weights, and the eager fallback where capture fails).

The maths of the step itself is pinned by tests/test_reference_step.py (fused Adam, the concatenated
forward, R1/R2 from the loss's forward and lazy regularisation all run there against a reference)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import DEMO, ROOT, TINY

from rgan_dist.config import load_config
from rgan_dist.engine.loop import Trainer

BASE = [*TINY, "train.batch_size=4", "train.log_every=1", "train.sample_every=0", "tracking.enabled=false",
        "data.workers=0"]


def _trainer(tmp_path, *overrides: str) -> Trainer:
    return Trainer(load_config(DEMO, [*BASE, f"run.out_dir={tmp_path}", *overrides]))


def test_adam_is_fused_and_steps_like_foreach():
    """Fused Adam (one kernel, or one vectorised CPU loop) makes the update foreach Adam makes."""
    torch.manual_seed(0)
    params = [torch.randn(16, 8), torch.randn(8)]
    runs = []
    for kw in ({"fused": True}, {"foreach": True}):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.Adam(ps, lr=2e-4, betas=(0.5, 0.999), **kw)
        for i in range(5):
            for p in ps:
                p.grad = torch.sin(p.detach() * (i + 1))
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_trainer_optimizers_are_fused(tmp_path):
    t = _trainer(tmp_path)
    try:
        assert all(opt.defaults["fused"] for opt in t.strategy.opt.values())
    finally:
        t.strategy.close()


@pytest.mark.parametrize(("overrides", "concat"), [
    (["model.d_batch_norm=false"], True),
    (["model.d_batch_norm=true"], False),  # batch statistics would mix real and fake
    (["model.d_batch_norm=false", "model.spectral_norm=true"], False),  # one power iteration instead of two
])
def test_one_d_forward_on_real_and_fake_only_for_a_d_without_batchnorm_or_buffers(tmp_path, overrides, concat):
    t = _trainer(tmp_path, *overrides)
    try:
        assert t.d_concat is concat
    finally:
        t.strategy.close()


def _run(tmp_path, steps: int, *overrides: str) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    t = _trainer(tmp_path, *overrides)
    try:
        out = [{k: float(v) for k, v in t.train_step().items()} for _ in range(steps)]
        return out, {**{f"G.{k}": v for k, v in t.strategy.G.state_dict().items()},
                     **{f"D.{k}": v for k, v in t.strategy.D.state_dict().items()}}
    finally:
        t.strategy.close()


def test_a_part_that_cannot_be_compiled_runs_eager_with_one_message(tmp_path, monkeypatch, capsys):
    """A capture failure (here: every compiled call raises, as a missing C++ compiler would) falls back to
    eager for that part, with one line per part, and the run computes what an eager run computes."""
    def broken_compile(fn, **kw):
        def call(*a):
            raise RuntimeError("backend failed\nsecond line of a long message")
        return call

    common = ["loss.name=rasgan", "loss.penalty=r1", "model.d_batch_norm=false", "loss.penalty_every=2"]
    eager_out, eager_w = _run(tmp_path / "eager", 3, *common)
    monkeypatch.setattr(torch, "compile", broken_compile)
    out, w = _run(tmp_path / "fallback", 3, *common, "train.compile=default")
    lines = [x for x in capsys.readouterr().out.splitlines() if "train.compile could not compile" in x]
    assert len(lines) == 3 and all("RuntimeError: backend failed); it runs eager" in x for x in lines)
    assert out == eager_out
    for k, v in eager_w.items():
        assert torch.equal(w[k], v), k


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("overrides", [
    ["loss.name=rasgan", "model.d_batch_norm=true"],
    ["loss.name=rsgan", "loss.penalty=r1", "loss.penalty_every=2", "model.d_batch_norm=false"],
], ids=["bn-d", "r1-lazy"])
def test_compiled_steps_match_eager(tmp_path, overrides, capsys):
    """train.compile=default (inductor; on CPU it needs the C++ compiler) against eager for 3 steps: same
    losses and weights up to float order (inductor fuses and reorders; measured differences ~1e-7)."""
    eager_out, eager_w = _run(tmp_path / "eager", 3, *overrides)
    comp_out, comp_w = _run(tmp_path / "compiled", 3, *overrides, "train.compile=default")
    assert "could not compile" not in capsys.readouterr().out  # compiled indeed, no eager fallback
    for a, b in zip(comp_out, eager_out, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    for k, v in eager_w.items():
        torch.testing.assert_close(comp_w[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_compiled_steps_match_eager_on_cuda(tmp_path, capsys, monkeypatch):
    """On CUDA with CUDA graphs (reduce-overhead; default is covered on CPU): a replay overwrites the previous
    outputs, so this also checks that the logged losses were copied out in time (they would differ from eager
    if not). TF32 off, so that only float order separates the two."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    common = ["loss.name=rsgan", "loss.penalty=r1", "loss.penalty_every=2", "model.d_batch_norm=false",
              "run.device=cuda"]
    eager_out, eager_w = _run(tmp_path / "eager", 4, *common)
    comp_out, comp_w = _run(tmp_path / "compiled", 4, *common, "train.compile=reduce-overhead")
    assert "could not compile" not in capsys.readouterr().out
    for a, b in zip(comp_out, eager_out, strict=True):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), k
    for k, v in eager_w.items():
        torch.testing.assert_close(comp_w[k], v, rtol=1e-3, atol=1e-4, msg=k)


def test_compile_accepts_the_old_booleans():
    assert load_config(None, ["train.compile=true"]).train.compile == "default"
    assert load_config(None, ["train.compile=false"]).train.compile == "none"
    assert load_config(None, ["train.compile=reduce-overhead"]).train.compile == "reduce-overhead"


# ---- the benchmark that measures all this (benchmarks/step_time.py, benchmarks/gpu_check.sh) ---------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_step_time_quick_dry_run_writes_json_and_its_table(tmp_path):
    """The plumbing of the step-time benchmark on CPU: every case of the CPU matrix on tiny models, the raw
    JSON, and the markdown RESULTS.md shows, generated from that JSON."""
    out = tmp_path / "st.json"
    script = str(ROOT / "benchmarks" / "step_time.py")
    proc = subprocess.run([sys.executable, script, "--matrix", "cpu", "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [e["label"] for e in report["cases"]] == ["DCGAN-16 w8 b4, fp32",
                                                     "DCGAN-16 w8 b4, fp32, D without BN, r1 every 16"]
    for e in report["cases"]:
        assert "error" not in e and len(e["ours"]) == len(e["ref"]) == 1
        assert e["ours"][0]["wall"] > 0 and e["ours"][0]["cpu"] > 0
    assert [e["ref_kind"] for e in report["cases"]] == ["plain", "vs"]
    table = subprocess.run([sys.executable, script, "--table", str(out)], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.count("\n| DCGAN-16") == 2
    assert "ours, DCGAN-16 w8 b4, fp32, D without BN" in table.stdout  # the lazy R1 row's reference


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
