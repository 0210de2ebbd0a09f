"""The held-out loss (``train.eval``) and the trackers (``train.report_to``), in one run in this process: the loss is the
same function at every evaluation and falls as the model learns; TensorBoard and an offline wandb run get the scalars,
the validation videos, the config and the bucket table."""

import importlib.util

import pytest

from sat_video.common.errors import ConfigError
from sat_video.training.callbacks import Callback
from sat_video.training.trackers import check_trackers
from tests.training.runs import evaluations, train_here

STEPS, EVERY = 40, 10


class EvaluateAgain(Callback):
    """At the last step, after the loop's own evaluation: the same weights evaluated once more."""

    name = "evaluate_again"

    def __init__(self):
        self.again = None

    def on_step_end(self, trainer, step) -> None:
        if step.iteration == STEPS:
            self.again = trainer.evaluate()


@pytest.mark.slow
def test_held_out_loss_is_one_function_and_falls_and_trackers_get_everything(train_assets, tmp_path, monkeypatch):
    from sat_video.fixtures.synthetic import make_moving_shapes

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    held_out = tmp_path / "held_out"
    make_moving_shapes(held_out, num_videos=3, num_frames=16, height=64, width=64, fps=8, seed=7)
    save, again = tmp_path / "run", EvaluateAgain()
    train_here(train_assets, save, f"train.train_iters={STEPS}", f"train.save_interval={STEPS}",
               f"train.eval.interval={EVERY}", f"train.eval.sources=[{held_out}]", "train.eval.timesteps=[200,600]",
               "train.ema.enabled=true", "train.ema.decay=0.9", "train.validation.weights=both",
               f"train.validation.interval={STEPS}", "train.validation.prompts=[a red circle]", "train.validation.steps=2",
               "data.buckets=[[9,64,64]]", "train.report_to=[tensorboard,wandb]", callbacks=[again])

    records = evaluations(save)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 40]  # the last: EvaluateAgain's
    assert all(r["eval_samples"] == 3 and r["eval_time_s"] > 0 for r in records)
    assert set(records[0]) >= {"eval_loss", "eval_loss_t200", "eval_loss_t600", "eval_ema_loss", "eval_ema_loss_t600"}
    assert records[0]["eval_loss"] == pytest.approx((records[0]["eval_loss_t200"] + records[0]["eval_loss_t600"]) / 2)
    loop, repeated = records[3], records[4]
    assert {k: v for k, v in loop.items() if "time" not in k} == {k: v for k, v in repeated.items() if "time" not in k}
    assert again.again["live"]["eval_loss"] == loop["eval_loss"]
    assert records[3]["eval_loss"] < 0.9 * records[0]["eval_loss"], records
    assert records[3]["eval_ema_loss"] != records[3]["eval_loss"]

    assert (save / "samples" / str(STEPS) / "ema" / "contact_sheet.png").is_file()
    assert len(list((save / "samples" / str(STEPS)).glob("*.mp4"))) == 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "eval/eval_loss", "eval/eval_ema_loss_t200"} <= set(tags["scalars"])
    strip = events.Images("validation_ema/000_a_red_circle")[0]  # a frame strip of the video
    assert (strip.width, strip.height) == (8 * 64, 64)
    assert {"config/text_summary", "data/buckets/text_summary"} <= set(tags["tensors"])

    runs = list((save / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    videos = list(runs[0].glob("files/media/videos/**/*.mp4"))
    assert len(videos) == 2, sorted(p.name for p in runs[0].rglob("*"))  # live and EMA
    assert (save / "wandb_run_id").read_text().strip() in runs[0].name


def test_a_tracker_that_is_not_installed_is_refused_at_start(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to lists wandb, not installed here: pip install -e \".\[wandb\]\""):
        check_trackers(["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        check_trackers(["none", "tensorboard"])
    assert check_trackers(["none"]) == []
