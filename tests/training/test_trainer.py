"""End-to-end training: torchrun with two CPU processes and DeepSpeed ZeRO-2 on real mp4 files, exact resume, a
SIGKILL while saving, a stuck rank; one process for bad files, non-finite steps and refused starts (in this process
where the run needs no process of its own)."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from sat_video.formats.sat_checkpoint import read_state_dict
from sat_video.training.watchdog import EXIT_GRACE_S, HANG_EXIT_CODE
from tests.conftest import ROOT, start_fake_build, write_hostile_videos
from tests.numerics import FLOAT32_RTOL, assert_close_rel
from tests.training.runs import BASE, command, launch, metrics, ok, train_here, train_video_here
from tools.train_video import main as train_video

pytestmark = pytest.mark.slow


def kill_process_tree(pid):
    """SIGKILL ``pid`` and every process below it at once, as a scheduler pre-empting a job does."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def test_two_processes_zero2_loss_finite_and_falls(train_assets, tmp_path):
    save = tmp_path / "run"
    proc = ok(launch(train_assets, save, "train.train_iters=40", "train.save_interval=20", "train.report_to=[tensorboard]",
                  "data.random_start=true", nproc=2))
    records = metrics(save)
    assert [r["step"] for r in records] == list(range(1, 41))
    # clips that change every epoch cannot be cached
    assert "in-run latent cache off: data.random_start cuts a different clip from each video every epoch" in proc.stderr
    assert not (save / "run_cache").exists() and all("cache_hit_rate" not in r for r in records)
    assert all(r[f"{phase}_s"] >= 0 for r in records for phase in ("data_wait", "encode", "forward", "backward", "optimizer"))
    # start-up (imports, model, DeepSpeed, first step) is reported once, in the log and the first record
    assert 1 < records[0]["startup_s"] < 300 and all("startup_s" not in r for r in records[1:])
    assert f"first step done {records[0]['startup_s']:.1f} s after the process started" in proc.stderr
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "skipped_steps"} <= set(records[0])
    losses = [r["loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, f"loss did not fall: first 5 {first:.3f}, last 5 {last:.3f}"
    assert records[0]["lr"] == pytest.approx(5e-4) and records[1]["lr"] == pytest.approx(1e-3)  # 2 warm-up steps
    assert min(r["lr"] for r in records) >= 1e-4 - 1e-12
    # SAT layout that our loader (and SAT's, which reads "module") takes
    assert (save / "latest").read_text().strip() == "40"
    state = read_state_dict(save)
    assert all(key.startswith("model.diffusion_model.") for key in state)
    assert sorted(p.name for p in (save / "40").glob("trainer_state_rank*.pt")) == [
        "trainer_state_rank0.pt",
        "trainer_state_rank1.pt",
    ]
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))
    # ZeRO-2's engine and every process group end before the interpreter's exit, where a gloo thread could abort it
    assert "outlived shutdown" not in proc.stderr


def test_resume_is_exact_with_two_processes_and_the_in_run_cache_changes_no_loss(train_assets, tmp_path):
    """8 clips, 2 ranks, 2 micro-batches of 1 per step: an epoch is 2 steps. The straight run encodes every clip every
    epoch; the other keeps them (the in-run cache, on by default), stops in its second epoch and resumes."""
    from sat_video.fixtures.synthetic import make_moving_shapes

    data = tmp_path / "data"
    make_moving_shapes(data, num_videos=8, num_frames=16, height=64, width=64, fps=8, seed=1)
    # decay_iters fixed: the schedule must not depend on train_iters, which the stopped run sets to 3
    common = [
        "train.save_interval=3",
        "train.gradient_accumulation_steps=2",
        "train.micro_batch_size=1",
        "data.num_workers=1",
        "train.lr_schedule.decay_iters=4",
        "model.dit.num_frames=9",
        "train.ema.enabled=true",  # its average resumes exactly too
        "train.ema.decay=0.5",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # validation in the straight run only: sampling must not change what training draws
    ok(
        launch(
            train_assets,
            straight,
            "train.train_iters=6",
            *common,
            "train.validation.interval=2",
            "train.validation.steps=2",
            "train.validation.prompts=[a red circle moving left]",
            "data.cache_latents=false",
            nproc=2,
            data=data,
        )
    )
    assert sorted(p.name for p in (straight / "samples").iterdir()) == ["2", "4", "6"]
    assert (straight / "samples" / "6" / "contact_sheet.png").is_file()
    ok(launch(train_assets, resumed, "train.train_iters=3", *common, nproc=2, data=data))
    proc = ok(launch(train_assets, resumed, "train.train_iters=6", "train.resume=latest", *common, nproc=2, data=data))
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["epoch"] for r in b] == [0, 0, 1, 1, 2, 2]
    assert "cache_hit_rate" not in a[0] and b[0]["cache_hit_rate"] == 0.0
    # with 2 ranks every entry is on disk as well, where the other rank and the resumed run read it
    assert len(list((resumed / "run_cache").glob("*/*.safetensors"))) == 8
    assert re.search(r"run cache .*: reusing [1-8] entries", proc.stderr) and b[-1]["cache_hit_rate"] > 0
    # the cached latents were encoded in other batches than the re-encoded ones: float32 rounding apart
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=FLOAT32_RTOL)
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    for weights in ("live", "ema"):
        wa, wb = read_state_dict(straight, weights), read_state_dict(resumed, weights)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert_close_rel(wb[key], wa[key], what=f"{weights} {key}")


def test_sigkill_while_saving_resumes_from_previous_checkpoint(train_assets, tmp_path):
    save = tmp_path / "run"
    # the same command both times; the average of the weights is saved beside them in each checkpoint
    args = ["train.train_iters=4", "train.save_interval=2", "train.resume=auto", "train.ema.enabled=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(  # each checkpoint's commit waits a few seconds (tests/training/paused_commit.py)
        command(train_assets, save, *args, nproc=2, script=ROOT / "tests" / "training" / "paused_commit.py"),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (save / ".tmp-4" / "trainer_state_rank1.pt").exists():  # staged, not yet committed
        assert proc.poll() is None and time.time() < deadline, (
            proc.stderr.read()[-3000:] if proc.poll() is not None else "timeout"
        )
        time.sleep(0.1)
    kill_process_tree(proc.pid)  # torchrun starts each worker in a session of its own
    proc.wait()
    assert (save / "latest").read_text().strip() == "2" and not (save / "4").exists()
    read_state_dict(save, "ema")  # the previous checkpoint is complete and loadable

    resumed = ok(launch(train_assets, save, *args, nproc=2))
    assert f"train.resume=auto: resuming from {save / '2'}" in resumed.stderr
    assert (save / "latest").read_text().strip() == "4" and not (save / ".tmp-4").exists()
    assert [r["step"] for r in metrics(save)] == [1, 2, 3, 4]


def test_bad_and_hostile_files_are_skipped_and_reported_and_a_killed_build_costs_nothing(train_assets, tmp_path, capsys):
    from sat_video.data.video_io import write_mp4

    data = tmp_path / "data"
    shutil.copytree(train_assets / "data", data)
    videos, labels = data / "videos", data / "labels"
    good = sorted(videos.glob("*.mp4"))[0]
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (videos / "notes.mp4").write_text("this is not a video\n")
    write_mp4(videos / "two_frames.mp4", torch.zeros(2, 64, 64, 3, dtype=torch.uint8).numpy(), fps=8)
    hostile = write_hostile_videos(videos)  # decoding huge.mp4's 13 frames would take over 3 GB
    bad = ["empty.mp4", "truncated.mp4", "notes.mp4", "two_frames.mp4", *hostile]
    for name in bad:
        (labels / name).with_suffix(".txt").write_text("a bad file\n")
    save = tmp_path / "run"
    # A process of its own: its peak memory is the run's, and DeepSpeed starts there for the first time, where a
    # first-run build of its shm op killed midway (as a pre-empted job leaves it) must neither block it nor be built again.
    extensions = tmp_path / "torch_extensions"
    killed = start_fake_build(extensions / "deepspeed_shm_comm")
    killed.kill()
    killed.wait()
    # 11 files, one process, micro-batch 1: 22 steps visit every file at least once
    proc = ok(launch(train_assets, save, "train.train_iters=22", "train.micro_batch_size=1", "train.save_interval=100", data=data,
                     env={"TORCH_EXTENSIONS_DIR": str(extensions)}))
    report = (save / "skipped_files.txt").read_text()
    for name in bad:
        assert name in report and name in proc.stderr
    for name, reason in hostile.items():
        assert f"{name}\t" in report and reason in report.split(f"{name}\t")[1].splitlines()[0]
    assert len(report.splitlines()) == len(bad)
    records = metrics(save)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in records])))
    assert max(r["cpu_peak_rss_gb"] for r in records) < 1.5, [r["cpu_peak_rss_gb"] for r in records]
    assert f"removed {extensions / 'deepspeed_shm_comm' / 'lock'}" in proc.stderr
    assert list(extensions.rglob("*")) == [extensions / "deepspeed_shm_comm"]  # nothing was built
    assert records[0]["startup_s"] < 60  # nothing waited for the lock

    # the finished run is not overwritten by a fresh start ...
    assert train_video_here(train_assets, save, "train.train_iters=1", data=data) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "train.resume=latest" in err
    assert (save / "latest").read_text().strip() == "22"
    # ... unless asked to
    train_here(train_assets, save, "train.train_iters=1", "train.overwrite=true", "train.micro_batch_size=1", data=data)
    assert (save / "latest").read_text().strip() == "1" and not (save / "22").exists()


def test_a_stuck_rank_ends_the_job_with_stacks_and_a_restart_continues_from_the_last_checkpoint(train_assets, tmp_path):
    save = tmp_path / "run"
    hang = ["model.dit.mixin_modules=[tests.training.hang_mixin]", "model.dit.mixins.hang.type=test_hang_on_rank",
            "model.dit.mixins.hang.rank=1", "model.dit.mixins.hang.after_forwards=2"]  # in each attempt, rank 1's 3rd step hangs
    # docs/troubleshooting.md's recipe for unattended jobs: torchrun restarts a failed job (its shared-store bug worked around),
    # and train.resume=auto continues from the last checkpoint. Attempt 1 hangs in step 3; attempt 2 runs steps 3-4.
    proc = ok(launch(train_assets, save, *hang, "train.train_iters=4", "train.save_interval=2", "train.hang_timeout_s=8",
                  "train.resume=auto", nproc=2, restarts=1,
                  env={"PYTHONPATH": str(ROOT), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}))
    saved = re.search(r"^(\S+ \S+) sat_video.train: saved checkpoint \S+/2$", proc.stderr, re.MULTILINE).group(1)
    saved_at = datetime.strptime(saved, "%Y-%m-%d %H:%M:%S,%f")
    failed = re.search(rf"^E(\d{{4}} \S+) .*failed \(exitcode: {HANG_EXIT_CODE}\)", proc.stderr, re.MULTILINE).group(1)
    failed_at = datetime.strptime(f"{saved_at.year}{failed}", "%Y%m%d %H:%M:%S.%f")  # torchrun's log has no year
    hung_for = (failed_at - saved_at).total_seconds()
    assert hung_for < 8 + EXIT_GRACE_S + 10, hung_for  # the limit, the dump grace, a margin
    assert "rank 1 made no progress for longer than train.hang_timeout_s=8 s while in stage 'forward/backward'" in proc.stderr
    assert "last completed: checkpoint 2" in proc.stderr
    stuck = (save / "hang-rank1.txt").read_text()
    assert "in add_position" in stuck and "hang_mixin.py" in stuck
    # rank 0 waits for rank 1 in DeepSpeed's gradient all-reduce; rank 1 waits a few seconds before exiting, so
    # rank 0's watchdog (started by the same checkpoint barrier) writes its own dump before torchrun ends it
    waiting = (save / "hang-rank0.txt").read_text()
    assert "rank 0 made no progress" in waiting and "in all_reduce" in waiting
    assert f"train.resume=auto: resuming from {save / '2'}" in proc.stderr  # the checkpoint was intact
    assert (save / "latest").read_text().strip() == "4"
    assert [r["step"] for r in metrics(save)] == [1, 2, 3, 4]


def test_dataset_without_usable_sample_fails_at_start(tmp_path, train_assets, capsys):
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    (data / "labels").mkdir()
    (data / "videos" / "a.mp4").write_bytes(b"")
    (data / "labels" / "a.txt").write_text("caption\n")
    assert train_video_here(train_assets, tmp_path / "run", data=data) == 2
    err = capsys.readouterr().err
    assert "no usable sample" in err and "a.mp4" in err


def test_non_finite_steps_stop_the_run_with_a_checkpoint(train_assets, tmp_path, capsys):
    save = tmp_path / "run"
    status = train_video_here(train_assets, save, "train.train_iters=20", "train.max_nonfinite_steps=3",
                              "train.optimizer.lr=1e30", "train.lr_schedule.warmup_iters=0", "train.lr_schedule.min_lr=0",
                              "train.grad_clip=0")
    assert status == 1 and "3 steps in a row had a non-finite loss or gradients" in capsys.readouterr().err
    records = metrics(save)
    assert records[-1]["skipped_steps"] == 3
    weights = read_state_dict(save)  # the last good state, saved before stopping
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


def test_config_typo_exits_nonzero_naming_the_key(capsys):
    assert train_video(["--base", *BASE, "model.dit.hiden_size=64"]) == 2
    err = capsys.readouterr().err
    assert "model.dit.hiden_size" in err and "did you mean 'hidden_size'" in err


def test_peak_rss_is_the_runs_own_not_the_launching_processs():
    # Linux's ru_maxrss carries the parent's peak across fork + exec: a run launched by a large process (this test
    # process, after full-width probes) would report it as its own
    ballast = bytearray(800 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])
    code = "from sat_video.training.metrics import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < len(ballast), child
