"""Validation and the held-out loss under ZeRO-3: two processes sample and evaluate with the engine's partitioned DiT
(every rank takes part in each forward), with the live weights and with their moving average swapped in; the main rank
writes the videos and logs the per-stage memory table, and training's losses and weights are those of the same run
without validation, evaluation or average."""

import math
import re

import pytest
import torch

from sat_video.formats.sat_checkpoint import EMA_STATES, read_state_dict
from tests.numerics import FLOAT32_RTOL, assert_close_rel
from tests.training.runs import evaluations, launch, metrics, ok

pytestmark = pytest.mark.slow

COMMON = ["deepspeed.zero_stage=3", "train.train_iters=4", "train.save_interval=4"]
VALIDATION = ["train.validation.interval=2", "train.validation.prompts=[a red square]", "train.validation.steps=2",
              "train.ema.enabled=true", "train.validation.weights=both", "train.eval.interval=2"]


def test_zero3_validation_samples_logs_memory_and_leaves_training_unchanged(train_assets, tmp_path):
    from sat_video.fixtures.synthetic import make_moving_shapes

    with_validation, without, held_out = tmp_path / "validated", tmp_path / "plain", tmp_path / "held_out"
    # 3 clips on 2 ranks: the second rank repeats one with weight 0, so that both run the same forwards
    make_moving_shapes(held_out, num_videos=3, num_frames=16, height=64, width=64, fps=8, seed=7)
    proc = ok(launch(train_assets, with_validation, *COMMON, *VALIDATION, f"train.eval.sources=[{held_out}]", nproc=2))
    # ZeRO-3's engine outlives shutdown() (its hooks hold it): the process ends without interpreter finalization
    assert "outlived shutdown(): ending the process without interpreter finalization" in proc.stderr
    ok(launch(train_assets, without, *COMMON, nproc=2))

    a, b = metrics(with_validation), metrics(without)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=FLOAT32_RTOL)
    # the average was swapped in and out again: the weights are those of the plain run (as its losses, to the rounding of
    # ZeRO-3's reductions, whose buckets validation's gathers reorder), judged at the model's scale
    weights, plain = read_state_dict(with_validation), read_state_dict(without)
    assert weights.keys() == plain.keys()
    assert_close_rel(torch.cat([weights[k].flatten() for k in plain]), torch.cat([plain[k].flatten() for k in plain]))
    held = evaluations(with_validation)
    assert [r["step"] for r in held] == [2, 4] and all(r["eval_samples"] == 3 for r in held)
    assert all(math.isfinite(r["eval_loss"]) and math.isfinite(r["eval_ema_loss"]) for r in held)
    assert len(list((with_validation / "samples" / "4" / "ema").glob("*.mp4"))) == 1
    assert (with_validation / "4" / EMA_STATES).is_file()

    assert sorted(p.name for p in (with_validation / "samples").iterdir()) == ["2", "4"]
    for iteration in ("2", "4"):
        assert len(list((with_validation / "samples" / iteration).glob("*.mp4"))) == 1, iteration
    assert not (without / "samples").exists()

    # "validation at iteration 2 took X s; samples in <folder>" then the table: header, one line per stage
    match = re.search(r"validation at iteration 2 took [\d.]+ s; samples in \S+\n(peak memory per stage.*:)\n"
                      r"((?:  \S.*\n?)+)", proc.stderr)
    assert match, proc.stderr[-4000:]
    stages = [line.strip() for line in match.group(2).splitlines()]
    for stage in ("T5", "DiT steps", "VAE decode"):
        assert any(line.startswith(stage) for line in stages), (stage, match.group(0))
