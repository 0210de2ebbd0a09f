"""The pure parts of the fine-tuning comparison (sat_video/benchmarks/trainer_comparison.py); the runs themselves are
a benchmark (tools/bench.py --only trainers), not a test."""

import pytest

from sat_video.benchmarks.trainer_comparison import profile_split, sat_step, split_cold_warm


def _step(seconds, epoch, **buckets):
    return {"step_time_s": seconds, "epoch": epoch, **buckets}


def test_the_first_step_is_neither_cold_nor_warm():
    steps = [_step(9.0, 0), _step(1.0, 0), _step(1.1, 0), _step(0.5, 1), _step(0.6, 2)]
    cold, warm = split_cold_warm(steps)
    assert [s["step_time_s"] for s in cold] == [1.0, 1.1]
    assert [s["step_time_s"] for s in warm] == [0.5, 0.6]


def test_sat_records_without_epoch_or_profile_keys_still_read():
    step = sat_step({"step": 9, "step_time_s": 0.2}, steps_per_epoch=8)
    assert step == {"step_time_s": 0.2, "epoch": 1}
    step = sat_step({"step": 1, "step_time_s": 0.2, "epoch": 0, "data_wait_s": 0.05, "forward_s": 0.1}, 8)
    assert step == {"step_time_s": 0.2, "epoch": 0, "data_s": 0.05, "forward_s": 0.1}


def test_profile_split_leaves_out_encoding_that_ran_in_another_thread():
    steps = [_step(1.0, 1, data_s=0.1, encode_s=0.3, forward_s=0.2, backward_s=0.3, optimizer_s=0.1)]
    assert profile_split(steps, encode_overlapped=False)["other"] == pytest.approx(0.0)
    split = profile_split(steps, encode_overlapped=True)
    assert split["other"] == pytest.approx(0.3) and split["encode_s"] == pytest.approx(0.3)
    assert profile_split([_step(1.0, 1)], encode_overlapped=False) is None
