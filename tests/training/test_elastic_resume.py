"""Resuming on another number of processes (train.resume_layout): the strict refusal before anything is loaded, and the
elastic resume through DeepSpeed's universal checkpoint (ZeRO-2): the weights and Adam moments right after loading are
the saved ones, the loss goes on, and every sample of the interrupted epoch is drawn once across the two parts."""

import hashlib

import pytest
import torch

from sat_video import load_config
from sat_video.data.sampler import ClipBatchSampler
from tests.conftest import ROOT
from tests.numerics import FLOAT32_RTOL, assert_identical
from tests.training.elastic_rank import record_run
from tests.training.runs import BASE, launch, metrics, ok, one_process_group, run_keys, train_video_here

pytestmark = pytest.mark.slow

RUN = ["train.micro_batch_size=1", "train.save_interval=1"]  # 4 clips: 4 batches an epoch on one rank, 2 on two
ELASTIC = "train.resume_layout=elastic"
SCRIPT = ROOT / "tests" / "training" / "elastic_rank.py"
CLIPS = 4


def here(assets, save, out, record_at, *overrides):
    with one_process_group():
        record_run(load_config(BASE, run_keys(assets, save, *RUN, *overrides)), out, record_at)
    return torch.load(out, weights_only=True)


def launched(assets, save, out, record_at, *overrides):
    ok(launch(assets, save, *RUN, *overrides, f"--out={out}", f"--record-at={record_at}", nproc=2, script=SCRIPT,
              env={"PYTHONPATH": str(ROOT)}))
    return torch.load(out, weights_only=True)


def assert_same_states(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert_identical(actual[name][key], expected[name][key], what=f"{name} {key}")


def loop(checkpoint):
    return torch.load(checkpoint / "trainer_state_rank0.pt", weights_only=True)["loop"]


def drawn_in(checkpoint, epoch, data_size):
    """The samples epoch ``epoch`` has drawn by ``checkpoint``, from its saved position on ``data_size`` ranks."""
    state = loop(checkpoint)
    position = state["data_position"]
    assert position[0] == epoch
    before = list(state.get("data_drawn", []))
    drawn = list(before)
    for rank in range(data_size):
        sampler = ClipBatchSampler([False] * CLIPS, 1, rank, data_size, 42, drawn=before)
        drawn += [index for batch in sampler.epoch_batches(epoch, before)[:position[1]] for index in batch]
    return drawn


def files_of(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def losses(save):
    return {record["step"]: record["loss"] for record in metrics(save)}


def test_one_process_to_two_and_back_resumes_weights_moments_and_data(train_assets, tmp_path, capsys):
    # The uninterrupted run on one process, recorded at iteration 2.
    one = here(train_assets, tmp_path / "one", tmp_path / "one.pt", 2, "train.train_iters=6")

    # Checkpoint 2 continued on two processes: what they hold right after loading is what one process saved.
    two_save = tmp_path / "two"
    two = launched(train_assets, two_save, tmp_path / "two.pt", 4, f"train.resume={tmp_path / 'one' / '2'}", ELASTIC,
                   "train.train_iters=4")
    assert_same_states(two["loaded"], one["recorded"])
    assert (tmp_path / "one" / "2" / "universal" / "zero").is_dir()  # converted once, beside the checkpoint
    # Epoch 0: two samples drawn by the one process, the other two by the two processes at iteration 3, none twice.
    assert sorted(drawn_in(two_save / "3", 0, 2)) == list(range(CLIPS))
    assert [r["epoch"] for r in metrics(two_save)] == [0, 1]

    # Back on one process. Strict (the default): refused before anything is loaded, and the run folder is unchanged.
    before = files_of(two_save)
    capsys.readouterr()
    assert train_video_here(train_assets, two_save, *RUN, "train.train_iters=6", "train.resume=auto") == 2
    message = capsys.readouterr().err
    assert "written by 2 data-parallel x 1 sequence-parallel processes, this run has 1 data-parallel" in message
    assert "train.resume_layout=elastic" in message and f"train.init_checkpoint={two_save / '4'}" in message
    assert files_of(two_save) == before

    # Elastic: the moments gathered from two partitions are those of one process, and epoch 1 is completed exactly.
    back = here(train_assets, two_save, tmp_path / "back.pt", 0, "train.train_iters=6", "train.resume=auto", ELASTIC)
    assert_same_states(back["loaded"], two["recorded"])
    assert sorted(drawn_in(two_save / "6", 1, 1)) == list(range(CLIPS))

    # The loss goes on within the noise of the uninterrupted run (other batches, other timesteps: not the same values).
    uninterrupted, resumed = losses(tmp_path / "one"), losses(two_save)
    assert list(resumed) == [3, 4, 5, 6]
    spread = max(uninterrupted.values()) - min(uninterrupted.values())
    for step in resumed:
        assert abs(resumed[step] - uninterrupted[step]) <= spread, (step, resumed, uninterrupted)


def test_two_sequence_ranks_resume_on_one_process(train_assets, tmp_path):
    # S=2 (one data-parallel group, ZeRO partitions over both ranks) -> S=1: the same data order and draws follow, so the
    # loss is the split run's own, to float32 rounding.
    split = launched(train_assets, tmp_path / "split", tmp_path / "split.pt", 2, "parallel.sequence_parallel_size=2",
                     "train.train_iters=4")
    save = tmp_path / "one"
    one = here(train_assets, save, tmp_path / "one.pt", 0, f"train.resume={tmp_path / 'split' / '2'}", ELASTIC,
               "train.train_iters=4")
    assert_same_states(one["loaded"], split["recorded"])
    expected, resumed = losses(tmp_path / "split"), losses(save)
    assert list(resumed) == [3, 4]
    assert [resumed[s] for s in resumed] == pytest.approx([expected[s] for s in resumed], rel=FLOAT32_RTOL)
