"""DeepSpeed's first-run C++ builds cannot wedge later runs: no shm op, a private build folder, stale locks removed."""

import sys
import time

import pytest
from deepspeed.comm.torch import build_shm_op

from sat_video.training.native_builds import clear_stale_build_locks, find_build_locks, private_extensions_dir, skip_shm_op
from tests.conftest import start_fake_build


@pytest.mark.slow
def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_build_is_left_alone(tmp_path):
    killed, live = start_fake_build(tmp_path / "deepspeed_shm_comm"), start_fake_build(tmp_path / "cpu_adam")
    try:
        killed.kill()
        killed.wait()
        assert {lock.path.parent.name: lock.builders for lock in find_build_locks(tmp_path)} == {
            "deepspeed_shm_comm": (), "cpu_adam": (live.pid,)}
        started = time.monotonic()
        assert clear_stale_build_locks(tmp_path) == [tmp_path / "deepspeed_shm_comm" / "lock"]
        assert time.monotonic() - started < 10  # a young lock is looked at again once it is a few seconds old
        assert (tmp_path / "cpu_adam" / "lock").exists()
    finally:
        live.kill()
        live.wait()


def test_deepspeed_starts_without_building_its_shm_op():
    skip_shm_op()
    assert build_shm_op() is None  # returns at once: nothing is compiled, no lock is taken


def test_each_install_builds_in_its_own_folder(monkeypatch):
    first = private_extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert private_extensions_dir() != first and private_extensions_dir().parent == first.parent
