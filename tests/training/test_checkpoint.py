"""What each rank's ``trainer_state_rank<r>.pt`` holds (sat_video/training/checkpoint.py): the loop's state under the keys
checkpoints have always had, the RNG, and each callback's state, read back on resume. One rank, in this process."""

import pytest
import torch

from sat_video import load_config
from sat_video.common.errors import CheckpointError
from sat_video.training.callbacks import Callback, StepEnd
from sat_video.training.distributed import init_distributed
from sat_video.training.trainer import Trainer, train
from tests.training.runs import BASE, metrics, one_process_group, run_keys, train_here

pytestmark = pytest.mark.slow

LOOP_KEYS = {"iteration", "data_position", "data_drawn", "nonfinite_streak", "skipped_steps", "skipped_files", "layout",
             "stage", "data_stream"}


class StepLog(Callback):
    """A feature as the seam takes one: it sees every step and resumes with the run."""

    name = "step_log"

    def __init__(self):
        self.steps: list[list] = []

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        assert trainer.state.iteration == step.iteration and not step.skipped
        self.steps.append([step.iteration, step.loss, step.lr])

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def test_a_callback_sees_every_step_and_its_state_resumes_with_the_run(train_assets, tmp_path):
    save = tmp_path / "run"
    first = StepLog()
    train_here(train_assets, save, "train.train_iters=2", "train.save_interval=1", callbacks=[first])
    assert first.steps == [[r["step"], r["loss"], r["lr"]] for r in metrics(save)]
    state_file = save / "2" / "trainer_state_rank0.pt"
    saved = torch.load(state_file, weights_only=True)
    assert set(saved) == {"rng", "loop", "step_log"} and set(saved["loop"]) == LOOP_KEYS
    assert saved["loop"]["iteration"] == 2 and saved["step_log"] == {"steps": first.steps}

    # A checkpoint written before "stage", "layout" and "data_drawn" were saved resumes as one of the first period, with
    # every process data-parallel; the Trainer here is built on the process group this test joined.
    for key in ("stage", "layout", "data_drawn"):
        del saved["loop"][key]
    torch.save(saved, state_file)
    resumed = StepLog()
    cfg = load_config(BASE, run_keys(train_assets, save, "train.train_iters=3", "train.resume=latest"))
    with one_process_group():
        trainer = Trainer(cfg, init_distributed(), callbacks=[resumed])
        try:
            assert trainer.state.iteration == 2 and trainer.state.period == 0 and resumed.steps == first.steps
            trainer.run()
        finally:
            trainer.close()
            del trainer  # its engine holds the process group
    assert [step for step, _, _ in resumed.steps] == [1, 2, 3]
    assert resumed.steps[2] == [3, *(metrics(save)[2][key] for key in ("loss", "lr"))]

    # a run with a callback cannot resume a checkpoint written without it: nothing to take its state from
    class Other(StepLog):
        name = "other"

    cfg = load_config(BASE, run_keys(train_assets, save, "train.train_iters=4", "train.resume=latest"))
    # caught inside the group's block: the error's traceback holds the half-built trainer, and so the group
    with one_process_group(), pytest.raises(CheckpointError, match=r"holds no 'other' state \(it holds: rng, loop, step_log\)"):
        train(cfg, [Other()])
