"""Training and sampling with the video tokens split over two processes (parallel.sequence_parallel_size=2, torchrun,
DeepSpeed ZeRO-2): the same losses, weights and videos as one process (run in this one), from video and from the latent
cache, with validation sampling, and an exact resume."""

import filecmp
import os
import subprocess
import sys

import pytest

from sat_video.formats.sat_checkpoint import read_state_dict
from sat_video.training.metrics import read_metrics
from tests.conftest import ROOT
from tests.numerics import FLOAT32_RTOL, assert_close_rel
from tests.training.runs import evaluations, one_process_group, run_keys, train_here

pytestmark = pytest.mark.slow

SPLIT = "parallel.sequence_parallel_size=2"
RUN = ["train.train_iters=10", "train.save_interval=5", "train.micro_batch_size=1"]


def command(variant, assets, save, *overrides, tool="train_video.py"):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    keys = run_keys(assets, save, *RUN) if tool == "train_video.py" else [f"model.text_encoder.path={assets / 't5'}"]
    return [*launcher, str(ROOT / "tools" / tool), "--base", *map(str, configs(variant)), *keys, *overrides]


def start(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command(*args, **kwargs), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(*procs):
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        assert "outlived shutdown" not in err, err[-4000:]  # every process group ended before the interpreter's exit


def losses(save):
    return {r["step"]: r["loss"] for r in read_metrics(save) if "loss" in r}


def assert_same_run(a, b, steps):
    la, lb = losses(a), losses(b)
    assert list(lb) == list(steps)
    assert [lb[step] for step in steps] == pytest.approx([la[step] for step in steps], rel=FLOAT32_RTOL)
    wa, wb = read_state_dict(a / "10"), read_state_dict(b / "10")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert_close_rel(wb[name], wa[name], what=name)


def configs(variant):
    return [ROOT / "configs" / name for name in (f"{variant}.yaml", "tiny.yaml", "tiny_train.yaml")]


def test_two_sequence_ranks_train_sample_and_resume_as_one_process(train_assets, tmp_path):
    from sat_video import load_config
    from tools.precompute_latents import encode

    # The split 5B run trains meanwhile; its validation sampling (split too) draws from its own generators: training is
    # unchanged.
    # The held-out loss of the split run (its group evaluates each clip together) is the one-process run's.
    validation = ["train.validation.interval=5", "train.validation.prompts=[a red circle]", "train.validation.steps=2"]
    held_out = ["train.eval.interval=10", f"train.eval.sources=[{train_assets / 'data'}]"]
    split_5b = start("cogvideox_5b", train_assets, tmp_path / "split_5b", SPLIT, *validation, *held_out)
    # One-process references, in this process: 5B from video, and 5B-I2V from a latent cache encoded here.
    train_here(train_assets, tmp_path / "one_5b", *RUN, *held_out, base=configs("cogvideox_5b"))
    cache = tmp_path / "i2v_latents"
    with one_process_group():
        encode(load_config(configs("cogvideox_5b_i2v"), [f"data.sources=[{train_assets / 'data'}]",
                                                         f"model.text_encoder.path={train_assets / 't5'}"]), cache, 2, False)
    from_cache = f"data.latent_cache={cache}"
    train_here(train_assets, tmp_path / "one_i2v", *RUN, from_cache, base=configs("cogvideox_5b_i2v"))
    finish(split_5b)
    assert_same_run(tmp_path / "one_5b", tmp_path / "split_5b", range(1, 11))
    (split,), (one,) = evaluations(tmp_path / "split_5b"), evaluations(tmp_path / "one_5b")
    assert split["eval_samples"] == one["eval_samples"] == 4
    assert split["eval_loss"] == pytest.approx(one["eval_loss"], rel=FLOAT32_RTOL)
    assert (tmp_path / "split_5b" / "samples" / "10" / "000_a_red_circle.mp4").is_file()

    # Resumed at checkpoint 5 under the same layout: steps 6-10 and the final weights are those of the straight run.
    # Side by side: the split 5B-I2V run from the cache.
    resume = f"train.resume={tmp_path / 'split_5b' / '5'}"
    finish(start("cogvideox_5b", train_assets, tmp_path / "resumed", SPLIT, resume),
           start("cogvideox_5b_i2v", train_assets, tmp_path / "split_i2v", SPLIT, from_cache))
    assert_same_run(tmp_path / "split_5b", tmp_path / "resumed", range(6, 11))
    assert_same_run(tmp_path / "one_i2v", tmp_path / "split_i2v", range(1, 11))

    # sample_video split over two processes writes, from checkpoint 10, the video that validation sampled at iteration
    # 10 with the same weights (split sampling equals one process's: tests/model/test_sequence_parallel.py).
    sample = ["--ckpt", str(tmp_path / "split_5b"), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "two")]
    finish(start("cogvideox_5b", train_assets, None, *sample, SPLIT, tool="sample_video.py"))
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["000_a_red_circle.mp4", "contact_sheet.png"]
    assert filecmp.cmp(tmp_path / "split_5b" / "samples" / "10" / "000_a_red_circle.mp4",
                       tmp_path / "two" / "000_a_red_circle.mp4", shallow=False)
