"""The Trainer's callbacks (how the sweep's trial hooks in) and `Strategy.set_hparams` (how PBT sets lr)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rgan_dist.checkpoint import CheckpointManager
from rgan_dist.config import load_config
from rgan_dist.engine import make_strategy
from rgan_dist.engine.hooks import Callback
from rgan_dist.engine.loop import TrainingDiverged, train

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TINY = ["model.resolution=16", "model.width=8", "model.z_dim=16", "train.batch_size=8", "train.progress=false",
        "tracking.enabled=false"]


class Recorder:  # duck-typed on purpose: a callback needs no base class
    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.stop_at = stop_at

    def on_start(self, trainer):
        self.calls.append(("start", trainer.step))

    def on_step_end(self, trainer, step, metrics):
        self.calls.append(("step", step, sorted(metrics)[:1]))
        return step == self.stop_at

    def on_eval(self, trainer, step, results):
        self.calls.append(("eval", step, results))

    def on_end(self, trainer, result, error):
        self.calls.append(("end", result.step if result else None, type(error).__name__ if error else None))


def test_callbacks_see_every_step_eval_and_the_end(tmp_path):
    cfg = load_config(DEMO, [*TINY, "train.steps=4", "train.log_every=2", "eval.every=2", f"run.out_dir={tmp_path}"])
    rec = Recorder()
    result = train(cfg, callbacks=[rec, Callback()], evaluator=lambda step, G: {"fid": 10.0 - step})
    assert result.step == 4 and not result.stopped
    assert rec.calls == [("start", 0), ("step", 1, []), ("step", 2, ["bad_steps"]), ("eval", 2, {"fid": 8.0}),
                         ("step", 3, []), ("step", 4, ["bad_steps"]), ("eval", 4, {"fid": 6.0}), ("end", 4, None)]


def test_a_callback_stops_the_run_with_a_final_checkpoint(tmp_path):
    cfg = load_config(DEMO, [*TINY, "train.steps=50", f"run.out_dir={tmp_path}"])
    result = train(cfg, callbacks=[Recorder(stop_at=3)])
    assert result.stopped and not result.interrupted and result.step == 3
    assert CheckpointManager(cfg.checkpoint_dir).latest().name == "ckpt-00000003.pt"


def test_on_end_sees_divergence_before_the_strategy_closes(tmp_path, monkeypatch):
    from rgan_dist import losses

    monkeypatch.setattr(losses, "d_loss", lambda *a, **kw: losses.torch.tensor(float("nan"), requires_grad=True))
    cfg = load_config(DEMO, [*TINY, "train.steps=5", "train.max_bad_steps=2", f"run.out_dir={tmp_path}"])
    rec = Recorder()
    with pytest.raises(TrainingDiverged):
        train(cfg, callbacks=[rec])
    assert rec.calls[-1] == ("end", None, "TrainingDiverged")


def test_set_hparams_sets_every_param_group(tmp_path):
    from rgan_dist.engine.loop import Trainer

    cfg = load_config(DEMO, [*TINY, "train.steps=1", f"run.out_dir={tmp_path}"])
    s = make_strategy(cfg)
    try:
        Trainer(cfg, strategy=s, evaluator=lambda step, G: {})
        s.set_hparams("g", lr=0.5, betas=(0.1, 0.2))
        s.set_hparams("d", lr=0.25)
        assert [(g["lr"], g["betas"]) for g in s.opt["g"].param_groups] == [(0.5, (0.1, 0.2))]
        assert [g["lr"] for g in s.opt["d"].param_groups] == [0.25]
        assert s.opt["d"].param_groups[0]["betas"] == tuple(cfg.train.betas)
    finally:
        s.close()
