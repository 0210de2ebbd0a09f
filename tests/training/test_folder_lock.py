"""One folder, one job: a live holder refuses a second job, which changes nothing there; the lock of a killed job, or
one nobody refreshes, is taken over with a warning; of many takers of a stale lock exactly one wins; a torchrun job
takes one lock for all its ranks, and all of them stop together when it is refused."""

import dataclasses
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time

import pytest

from sat_video.common.errors import FolderInUseError
from sat_video.data.latent_cache import LatentCache
from sat_video.training.folder_lock import FolderLock, LockHolder, hold_folder_lock, lock_file_beside
from tests.conftest import ROOT
from tests.training.runs import BASE, launch

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LOGGER = "sat_video.training.folder_lock"
# A job holding the lock on argv[1]; it refreshes only hourly, so that the lock file stays as it is during a test.
HOLDER = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from sat_video.training.folder_lock import FolderLock\n"
    "FolderLock(Path(sys.argv[1]), 'the folder', 300, refresh_s=3600).acquire()\n"
    "print('holding', flush=True)\n"
    "time.sleep(600)\n"
)
ELSEWHERE = {"host": "node-elsewhere", "pid": 4242, "pid_space": "another-boot/pid:[1]"}


def start_holder(lock_file):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_file)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def stop(proc):
    proc.kill()
    proc.wait()
    proc.stdout.close()


def write_lock(lock_file, age_s=0.0, **changes):
    """A lock file as another job left it (``changes`` to this process's record), last refreshed ``age_s`` ago."""
    holder = dataclasses.replace(LockHolder.this_process(), **changes)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock_file.write_bytes(holder.record())
    os.utime(lock_file, (time.time() - age_s,) * 2)
    return holder


def write_run(folder):
    """What a run leaves in its folder: a checkpoint, ``latest``, logs."""
    (folder / "200").mkdir(parents=True)
    (folder / "200" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (folder / "latest").write_text("200\n")
    (folder / "metrics.jsonl").write_text('{"step": 200, "loss": 0.5}\n')
    (folder / "config.yaml").write_text("train: {}\n")


def snapshot(folder):
    """Every entry under ``folder``, hidden ones included, with its bytes and modification time; and the folder's own
    modification time, which any file created and removed again changes."""
    entries = {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else None)
               for path in sorted(folder.rglob("*"))}
    return entries, folder.stat().st_mtime_ns


def test_a_live_holder_refuses_a_second_job_which_changes_nothing_in_the_folder(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    holder = start_holder(run / ".lock")
    try:
        before = snapshot(run)
        with pytest.raises(FolderInUseError) as refused:
            with hold_folder_lock(FolderLock(run / ".lock", f"train.save={run}", 300), is_main=True):
                pytest.fail("the block ran without the lock")
        assert snapshot(run) == before
    finally:
        stop(holder)
    message = str(refused.value)
    assert message.startswith(f"train.save={run} is in use by another job: {run / '.lock'} is held by process {holder.pid} "
                              f"on host {socket.gethostname()} (this host), started ")
    assert f"command: {shlex.join([sys.executable, '-c', HOLDER, str(run / '.lock')])}; refreshed " in message
    assert "Wait for that job to end or stop it, or choose another folder" in message
    assert "not been refreshed for train.lock_stale_s=300 s" in message


def test_the_lock_of_a_killed_job_is_taken_over_by_its_restart_with_a_warning(tmp_path, caplog):
    lock_file = tmp_path / "run" / ".lock"
    holder = start_holder(lock_file)
    holder.kill()
    os.waitid(os.P_PID, holder.pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped: a zombie keeps its PID
    lock = FolderLock(lock_file, "train.save=run", 300)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        me = lock.acquire()
    stop(holder)
    try:
        assert LockHolder.parse(lock_file.read_bytes()) == me
        host = socket.gethostname()
        assert f"took over {lock_file}, the lock of process {holder.pid} on host {host} (this host)" in caplog.text
        assert f"process {holder.pid} has ended" in caplog.text
    finally:
        lock.release()
    assert sorted(os.listdir(lock_file.parent)) == []


@pytest.mark.parametrize("left, age_s, reason", [
    ({"pid_start": -1}, 0.0, r"process {pid} has ended"),  # a live PID of this host, of a process started at another time
    (ELSEWHERE, 400.0, r"not refreshed for 40\d s \(train.lock_stale_s=300\)"),
], ids=["pid-reused", "not-refreshed"])
def test_a_stale_lock_is_taken_over_with_a_warning_that_names_it(tmp_path, caplog, left, age_s, reason):
    lock_file = tmp_path / ".lock"
    stale = write_lock(lock_file, age_s, **left)
    lock = FolderLock(lock_file, "train.save=run", 300)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        lock.acquire()
    lock.release()
    assert re.search(re.escape(f"took over {lock_file}, the lock of {stale.describe()}: ") + reason.format(pid=stale.pid),
                     caplog.text)


def test_a_lock_refreshed_on_another_host_is_not_stale(tmp_path):
    lock_file = tmp_path / ".lock"
    write_lock(lock_file, 250.0, **ELSEWHERE)
    with pytest.raises(FolderInUseError, match=r"held by process 4242 on host node-elsewhere, started .*; refreshed 25\d s ago"):
        FolderLock(lock_file, "train.save=run", 300).acquire()


def test_an_earlier_attempt_of_the_same_torchrun_job_on_another_host_is_waited_for(tmp_path, monkeypatch, caplog):
    # rank 0 of the restarted attempt runs on another host than the killed one: its lock cannot be checked from here
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    lock_file = tmp_path / ".lock"
    write_lock(lock_file, 59.0, **ELSEWHERE, torchrun_run="job-7", torchrun_attempt=0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        lock = FolderLock(lock_file, "train.save=run", 60)
        lock.acquire()
    lock.release()
    assert 0.5 < time.monotonic() - started < 10
    assert "of an earlier attempt of this torchrun job" in caplog.text and "took over" in caplog.text

    # refreshed while this attempt waits: it is alive after all (a hung node), and this attempt is refused
    write_lock(lock_file, 30.0, **ELSEWHERE, torchrun_run="job-7", torchrun_attempt=0)
    threading.Timer(1.0, os.utime, (lock_file,)).start()
    with pytest.raises(FolderInUseError, match="is held by process 4242 on host node-elsewhere"):
        FolderLock(lock_file, "train.save=run", 60).acquire()


def race(locks):
    """``acquire()`` of every lock at once, each in its own thread; the locks taken."""
    together, won = threading.Barrier(len(locks)), []

    def take(lock):
        together.wait()
        try:
            lock.acquire()
        except FolderInUseError:
            return
        won.append(lock)

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_of_many_jobs_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    lock_file = tmp_path / ".lock"
    for _ in range(10):
        write_lock(lock_file, 400.0, **ELSEWHERE)
        won = race([FolderLock(lock_file, "train.save=run", 300) for _ in range(6)])
        assert len(won) == 1
        won[0].release()
        assert os.listdir(tmp_path) == []  # no claim or temporary file left


def test_the_holder_refreshes_its_lock_says_when_it_lost_it_and_removes_only_its_own(tmp_path, caplog):
    folder = tmp_path / "new" / "run"
    lock = FolderLock(folder / ".lock", "train.save=run", 300, refresh_s=0.05)
    lock.acquire()
    os.utime(folder / ".lock", (0, 0))
    deadline = time.monotonic() + 10
    while (folder / ".lock").stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (folder / ".lock").stat().st_mtime > time.time() - 60
    lock.release()
    assert not folder.exists()  # taking the lock created it, and the job wrote nothing there

    lock.acquire()
    (folder / "config.yaml").write_text("train: {}\n")
    other = write_lock(folder / ".lock", **ELSEWHERE)  # as if taken over while this job was stalled
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        time.sleep(0.5)
        lock.release()
    assert f"{folder / '.lock'} is no longer this job's lock (taken over as stale by {other.describe()})" in caplog.text
    assert LockHolder.parse((folder / ".lock").read_bytes()) == other


# ---------------------------------------------------------------------------------------------------- the tools


def torchrun(nproc):
    """The launcher of ``nproc`` processes; torchrun looks at its workers every 5 s, so that when one rank exits, the others
    end by themselves (with their own message) before it stops them."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--monitor-interval=5"]


def precompute(assets, out, nproc):
    command = [*torchrun(nproc), str(ROOT / "tools" / "precompute_latents.py"), "--base", *BASE,
               f"data.sources=[{assets / 'data'}]", f"model.text_encoder.path={assets / 't5'}", "--out", str(out)]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_precompute_under_torchrun_takes_one_lock_beside_its_output_and_both_ranks_stop_when_it_is_held(train_assets,
                                                                                                         tmp_path):
    cache = tmp_path / "cache"
    lock_file = lock_file_beside(cache)
    holder = start_holder(lock_file)
    try:
        before = snapshot(tmp_path)
        proc = precompute(train_assets, cache, nproc=2)
        assert proc.returncode != 0
        refusal = (f"precompute_latents: error: --out {cache} is in use by another job: {lock_file} is held by process "
                   f"{holder.pid}")
        assert proc.stderr.count(refusal) == 2, proc.stderr[-4000:]  # rank 0's verdict, on both ranks
        assert snapshot(tmp_path) == before  # no cache, no staging folder, the holder's lock as it was
    finally:
        stop(holder)

    # its restart takes the dead job's lock over, once for both ranks, and removes it at the end
    proc = precompute(train_assets, cache, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count(f"took over {lock_file}, the lock of process {holder.pid}") == 1
    assert len(LatentCache(cache)) == 4 and sorted(os.listdir(tmp_path)) == ["cache"]


@pytest.mark.slow
def test_train_video_on_a_run_folder_a_live_job_holds_stops_every_rank_and_changes_nothing(train_assets, tmp_path):
    save = tmp_path / "run"
    write_run(save)
    holder = start_holder(save / ".lock")
    try:
        before = snapshot(save)
        refusal = (f"train_video: error: train.save={save} is in use by another job: {save / '.lock'} is held by process "
                   f"{holder.pid}")
        proc = launch(train_assets, save, "train.resume=auto")
        assert proc.returncode == 2 and refusal in proc.stderr, proc.stderr[-4000:]
        proc = launch(train_assets, save, "train.resume=auto", nproc=2, monitor_interval_s=5)
        assert proc.returncode != 0 and proc.stderr.count(refusal) == 2, proc.stderr[-4000:]
        assert snapshot(save) == before
    finally:
        stop(holder)
