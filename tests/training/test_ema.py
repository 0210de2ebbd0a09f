"""The moving average of the weights (``train.ema``): its values under ZeRO-2 on two processes and ZeRO-3, what a skipped
step does to it, the checkpoint file that sampling and export read, and the refused resume."""

import pytest
import torch

from sat_video.common.errors import CheckpointError, ConfigError, RunStopped
from sat_video.formats.sat_checkpoint import EMA_STATES, SAT_PREFIX, read_state_dict
from sat_video.training import ema
from sat_video.training.callbacks import Callback
from tests.conftest import ROOT
from tests.numerics import assert_close_rel, assert_identical
from tests.training.runs import BASE, launch, ok, train_here

EMA_ON = "train.ema.enabled=true"
SCRIPT = ROOT / "tests" / "training" / "ema_rank.py"


@pytest.mark.slow
def test_average_values_under_zero2_on_two_processes_and_zero3(train_assets, tmp_path):
    """Three steps for each decay: 0 follows the weights, 1 keeps the initial ones, 0.5 is the hand-computed average; the
    gathered average of a rank's partitions is the whole, and each of the two ranks holds about half of it."""
    out = tmp_path / "ema.pt"
    ok(launch(train_assets, tmp_path / "runs", EMA_ON, "train.train_iters=3", "train.micro_batch_size=1",
              f"--out={out}", "--stages", "2", "3", "--decays", "0", "0.5", "1", nproc=2, script=SCRIPT,
              env={"PYTHONPATH": str(ROOT)}))
    results = torch.load(out, weights_only=True)
    for stage in (2, 3):
        for decay in (0.0, 0.5, 1.0):
            run = results[(stage, decay)]
            weights, average = run["weights"], run["ema"]
            assert average.keys() == weights[0].keys() and len(weights) == 4
            for key in average:
                what = f"ZeRO-{stage} decay {decay} {key}"
                assert not torch.equal(weights[3][key], weights[0][key]), f"{what}: did not train"
                if decay == 0.0:
                    assert_identical(average[key], weights[3][key], what=what)
                elif decay == 1.0:
                    assert_identical(average[key], weights[0][key], what=what)
                else:
                    expected = weights[0][key]
                    for step in (1, 2, 3):
                        expected = 0.5 * expected + 0.5 * weights[step][key]
                    assert_close_rel(average[key], expected, what=what)
            assert 0.45 * run["trained_bytes"] < run["held_bytes"] < 0.55 * run["trained_bytes"], (stage, decay, run)


class RecordAverage(Callback):
    """The average gathered after every step, with whether the step was applied."""

    name = "record_average"

    def __init__(self):
        self.after = []

    def on_step_end(self, trainer, step) -> None:
        self.after.append((step.skipped, ema.gather(trainer.engine, trainer.engine.module.dit, keep=True)))


def test_a_skipped_step_leaves_the_average_alone_under_zero0(train_assets, tmp_path):
    """An LR of 1e30 makes the weights overflow after a few steps; the later steps are skipped as non-finite (ZeRO-0 in
    fp32: our optimizer's own check) and must not move the average."""
    recorder = RecordAverage()
    with pytest.raises(RunStopped):
        train_here(train_assets, tmp_path / "run", EMA_ON, "train.ema.decay=0.5", "deepspeed.zero_stage=0",
                   "train.train_iters=12", "train.max_nonfinite_steps=3", "train.optimizer.lr=1e30",
                   "train.lr_schedule.warmup_iters=0", "train.lr_schedule.min_lr=0", "train.grad_clip=0",
                   callbacks=[recorder])
    skipped = [index for index, (was_skipped, _) in enumerate(recorder.after) if was_skipped]
    assert len(skipped) == 3 and skipped[0] > 0
    for index in skipped:
        before, after = recorder.after[index - 1][1], recorder.after[index][1]
        for key in after:
            assert_identical(after[key], before[key], what=f"step {index + 1} (skipped) {key}")
    # the checkpoint written at the stop carries the last average
    saved = torch.load(tmp_path / "run" / str(len(recorder.after)) / EMA_STATES, weights_only=True)["module"]
    for key, value in recorder.after[-1][1].items():
        assert_identical(saved[key], value, what=key)


def test_lora_average_file_loads_over_the_weights_and_a_resume_without_average_is_refused(train_assets, tmp_path):
    """Under LoRA the average covers the LoRA factors only; ``weights="ema"`` puts them over the saved weights. A run that
    kept no average cannot be resumed with one, and a checkpoint without the file names the reason."""
    plain = tmp_path / "plain"  # a few full steps first: from a random start (zero output layer) LoRA gets no gradient
    train_here(train_assets, plain, "train.train_iters=2")
    run = tmp_path / "lora"
    train_here(train_assets, run, EMA_ON, "train.ema.decay=0.5", "train.train_iters=2", f"train.init_checkpoint={plain}",
               base=[*BASE, str(ROOT / "configs" / "lora.yaml")])
    live, average = read_state_dict(run), read_state_dict(run, weights="ema")
    ema_keys = set(torch.load(run / "2" / EMA_STATES, weights_only=True)["module"])
    assert ema_keys and all(key.startswith(SAT_PREFIX + "mixins.lora.") for key in ema_keys)
    assert live.keys() == average.keys()
    for key in live:
        if ".matrix_B." in key:  # A has no gradient while B is still zero, at the first step
            assert not torch.equal(average[key], live[key]), key
        elif key not in ema_keys:
            assert_identical(average[key], live[key], what=key)

    with pytest.raises(CheckpointError, match="had train.ema off"):
        read_state_dict(plain, weights="ema")
    with pytest.raises(CheckpointError, match="kept no average of the weights"):
        train_here(train_assets, plain, EMA_ON, "train.train_iters=3", "train.resume=latest")
    with pytest.raises(ConfigError, match="train.validation.weights=ema needs train.ema.enabled=true"):
        train_here(train_assets, tmp_path / "refused", "train.validation.weights=ema")
