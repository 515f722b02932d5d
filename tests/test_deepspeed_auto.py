"""DeepSpeed configs copied from Hugging Face/Accelerate templates: "auto" is filled from the rgan config, a
concrete value that contradicts it is still a one-line error. The template is tests/data/ds_config_zero2_hf.json:
transformers' tests/deepspeed/ds_config_zero2.json, with two changes a user of this trainer makes: the optimizer
offload device "none" (Accelerate's spelling of no offload; CPU offload would replace the project's Adam) and
`reduce_bucket_size` "auto" (as in its ZeRO-3 template), so that an "auto" DeepSpeed should default is covered."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import DEMO, ROOT
from jobs import JOB, ckpt, ok, run_job

from rgan_dist.config import load_config
from rgan_dist.engine.deepspeed import deepspeed_config
from rgan_dist.errors import ConfigError

HF_ZERO2 = ROOT / "tests" / "data" / "ds_config_zero2_hf.json"


def _cfg(spec: str, *extra: str):
    return load_config(None, ["dist.strategy=deepspeed", f"dist.deepspeed_config={spec}", *extra])


def test_hf_template_autos_are_filled_from_the_config():
    cfg = _cfg(str(HF_ZERO2), "train.batch_size=4", "train.precision=bf16")
    out = deepspeed_config(cfg, world_size=8)
    assert (out["train_micro_batch_size_per_gpu"], out["train_batch_size"], out["gradient_accumulation_steps"]) == (
        4, 32, 1)
    assert out["gradient_clipping"] == 0.0  # no clipping, as the other strategies
    # Precision and optimizer are ours (bf16 autocast over fp32 weights, the client torch Adam): sections dropped.
    assert not {"fp16", "bf16", "optimizer", "scheduler"} & set(out)
    # compute_grad_norm: off because clipping is 0 (no per-step host read of the norm: the sync-free step)
    assert out["zero_optimization"] == {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                                        "overlap_comm": True, "reduce_scatter": True, "contiguous_gradients": True,
                                        "compute_grad_norm": False}
    assert "auto" not in json.dumps(out)
    # Values that restate the config are accepted too.
    same = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {
        "lr": 2e-4, "betas": [0.5, 0.9], "eps": 1e-8, "weight_decay": 0}}, "bf16": {"enabled": False}}
    deepspeed_config(_cfg(json.dumps(same), "train.batch_size=4", "train.lr_g=2e-4", "train.lr_d=2e-4",
                          "train.betas=[0.5, 0.9]"), world_size=2)


BAD = [
    ({"train_micro_batch_size_per_gpu": 7}, "train_micro_batch_size_per_gpu=7 contradicts the run (4"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 contradicts the run"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": "auto"}}},
     "optimizer.params.lr=0.001 contradicts the run (train.lr_g="),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.999]}}},
     "optimizer.params.betas=[0.9, 0.999] contradicts the run (train.betas=[0.5, 0.999])"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": 0.01}}},
     "optimizer.params.weight_decay=0.01 contradicts the run"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": "auto", "betas": "auto"}}}, "'optimizer' is decided by"),
    ({"optimizer": {"type": "Adam"}}, "'optimizer' is decided by rgan-dist"),
    ({"bf16": {"enabled": True}}, "'bf16' is decided by rgan-dist: set train.precision=bf16"),
    ({"fp16": {"enabled": True}}, "'fp16' is decided by rgan-dist"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100, "warmup_max_lr": "auto"}}},
     "'scheduler' is decided by rgan-dist"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer is not supported"),
    ({"steps_per_print": "auto"}, 'steps_per_print="auto" is not a value rgan-dist fills'),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, "stage=3 not supported"),
]


@pytest.mark.parametrize(("ds", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_contradicting_values_are_one_line_errors(ds, message):
    with pytest.raises(ConfigError) as e:
        deepspeed_config(_cfg(json.dumps(ds), "train.batch_size=4", "train.lr_g=1e-4"), world_size=2)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_contradicting_template_in_one_line(tmp_path):
    bad = json.loads(HF_ZERO2.read_text())
    bad["train_micro_batch_size_per_gpu"] = 16
    (tmp_path / "ds.json").write_text(json.dumps(bad))
    proc = run_job([sys.executable, "-m", "launcher", "train", "--config", str(DEMO), *JOB, "dist.strategy=deepspeed",
                    f"dist.deepspeed_config={tmp_path / 'ds.json'}", "--print-config"], timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "train_micro_batch_size_per_gpu=16 contradicts the run (4" in lines[0], proc.stdout


@pytest.mark.slow
def test_hf_template_trains_like_the_single_process_strategy(tmp_path):
    """`rgan train` with the copied template (a plain process: DeepSpeed world of one) trains 3 steps, and its
    weights equal the plain single-process strategy's: the filled lr/betas/clipping are the config's."""
    steps = ["train.steps=3", "loss.penalty=r1", "model.d_batch_norm=false"]
    ok(run_job([sys.executable, "-m", "launcher", "train", "--config", str(DEMO), *JOB, *steps,
                "dist.strategy=deepspeed", f"dist.deepspeed_config={HF_ZERO2}", f"run.out_dir={tmp_path / 'ds'}"],
               timeout=240))
    ok(run_job([sys.executable, "-m", "launcher", "train", "--config", str(DEMO), *JOB, *steps,
                f"run.out_dir={tmp_path / 'single'}"], timeout=120))
    ds, single = ckpt(tmp_path / "ds", 3), ckpt(tmp_path / "single", 3)
    assert ds["model"]["zero_stage"] == 2
    for part in ("G", "D"):
        for k, v in single["model"][part].items():
            torch.testing.assert_close(ds["model"][part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
