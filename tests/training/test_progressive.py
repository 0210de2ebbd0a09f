"""train.stages (sat_video/training/progressive.py): what a stage may change, its boundaries, its learning rate."""

import pytest

from sat_video.common.errors import ConfigError
from sat_video.training.progressive import lr_lambda_by_period, period_of, plan_periods
from tests.conftest import ROOT, tiny_config

STAGES = ("train.train_iters=6", "train.lr_schedule.warmup_iters=2", "train.lr_schedule.decay_style=constant")


def staged(*stages, extra=()):
    from sat_video import load_config

    layer = {"train": {"stages": [dict(until=until, set=values) for until, values in stages]}}
    return load_config([ROOT / "configs" / "cogvideox_5b.yaml", ROOT / "configs" / "tiny.yaml", layer], [*STAGES, *extra])


def test_each_stage_is_the_run_config_with_its_own_keys_set():
    cfg = staged((2, {"data.fps": 4.0, "data.buckets": [[9, 48, 64]]}), (6, {"train.micro_batch_size": 3}))
    first, second = plan_periods(cfg)
    assert (first.start, first.until, second.start, second.until) == (0, 2, 2, 6)
    assert first.cfg.data.fps == 4.0 and first.cfg.data.buckets == [[9, 48, 64]] and first.cfg.train.micro_batch_size == 1
    # not cumulative: the second stage is the run config with only its own keys set
    assert second.cfg.data.fps == 8.0 and second.cfg.data.buckets == [] and second.cfg.train.micro_batch_size == 3
    assert [period_of([first, second], i).index for i in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert [s.until for s in plan_periods(tiny_config("cogvideox_5b", "train.train_iters=7"))] == [7]  # no stages: one


@pytest.mark.parametrize("stages, message", [
    (((3, {"model.dit.hidden_size": 128}), (6, {})), r"train.stages\[0\].set: 'model.dit.hidden_size' cannot change"),
    (((3, {"deepspeed.zero_stage": 3}), (6, {})), r"'deepspeed.zero_stage' cannot change in the middle of a run"),
    (((3, {"data.fsp": 4}), (6, {})), r"'data.fsp' cannot change.*did you mean 'data.fps'"),
    (((4, {}), (3, {})), r"train.stages\[1\].until=3: stages must end in increasing order after iteration 4"),
    (((3, {}),), r"the last stage ends at iteration 3, train.train_iters is 6"),
    (((3, {"data.buckets": [[8, 64, 64]]}), (6, {})), r"train.stages\[0\]: data.buckets\[0\] = \[8, 64, 64\]: frames"),
    (((3, {"data.fps": -1.0}), (6, {})), r"train.stages\[0\]: data.fps"),
    (((3, {"train.optimizer.lr": 1e-5}), (6, {})), r"train.stages\[0\]: train.lr_schedule.min_lr \(0.0001\) must lie"),
])
def test_what_cannot_change_mid_run_or_is_invalid_is_refused_naming_the_stage(stages, message):
    with pytest.raises(ConfigError, match=message):
        staged(*stages, extra=("train.optimizer.lr=1e-3", "train.lr_schedule.min_lr=1e-4"))


def test_lr_follows_the_run_schedule_unless_a_stage_sets_lr_or_warmup():
    plain = staged((3, {"data.fps": 4.0}), (6, {}))
    assert [lr_lambda_by_period(plain, plan_periods(plain))(i) for i in range(6)] == [0.5, 1, 1, 1, 1, 1]
    restarted = staged((3, {}), (6, {"train.optimizer.lr": 5e-4}))  # base lr 1e-5 in the model config
    multiplier = lr_lambda_by_period(restarted, plan_periods(restarted))
    base = restarted.train.optimizer.lr
    assert [round(multiplier(i) * base, 12) for i in range(6)] == [base / 2, base, base, 2.5e-4, 5e-4, 5e-4]


def test_the_shipped_progressive_recipe_loads_with_two_stages():
    from sat_video import load_config

    cfg = load_config([ROOT / "configs" / n for n in ("cogvideox_5b.yaml", "sft.yaml", "recipes/progressive.yaml")],
                      ["data.sources=[/data/hq]"])
    low, high = plan_periods(cfg)
    assert (low.until, high.until) == (6000, 10000) and low.cfg.data.sources == ["/data/lq_videos"]
    assert low.cfg.data.buckets[0] == [17, 256, 384] and high.cfg.data.buckets[0] == [49, 480, 720]
    assert high.cfg.data.sources == ["/data/hq"] and high.cfg.train.lr_schedule.warmup_iters == 100
