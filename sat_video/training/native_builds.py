"""DeepSpeed's just-in-time C++ ops: which ones a run lets it build, where, and what an interrupted build leaves.

DeepSpeed compiles some ops with ninja the first time they are used, into torch's extension folder
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, shared by every install of the user). A build
holds ``<folder>/<op>/lock`` while it runs. A process killed mid-build leaves the lock behind, and every later
build of that op waits for it forever without a word (``torch.utils.cpp_extension`` polls for the file to go).

* On CPU, DeepSpeed's communication backend builds ``deepspeed_shm_comm`` when it starts. Only
  ``inference_all_reduce`` (tensor-parallel inference) uses it: ZeRO's gradient reduction and every collective a
  training run makes go through ``torch.distributed`` (gloo) whether it is built or not. So runs skip it.
* Any op DeepSpeed still builds (one that a ``deepspeed.extra`` setting asks for) goes to a folder private to this
  install, unless the user set ``TORCH_EXTENSIONS_DIR``.
* Before DeepSpeed starts, a build lock that no live process of this machine is building under is removed, and the
  log says so; a lock under a live build is reported with the builder's PID. (A ``TORCH_EXTENSIONS_DIR`` shared by
  several machines would let one remove a lock another is building under: give each machine its own.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sat_video.common.errors import BuildLockError

logger = logging.getLogger(__name__)

EXTENSIONS_DIR_ENV = "TORCH_EXTENSIONS_DIR"
LOCK_NAME = "lock"
"""``torch.utils.cpp_extension``'s ``FileBaton`` file in an op's build folder."""
STARTING_BUILD_S = 5.0
"""A build creates its lock a moment before ninja starts in the build folder; a lock younger than this with no
builder yet may be one starting, so it is looked at again until it is this old."""


def private_extensions_dir() -> Path:
    """``~/.cache/sat_video/torch_extensions/<install>``: one folder per Python environment and machine, so that two
    installs never build over each other's files, and a lock is only ever judged on the machine whose processes
    hold it (home folders are often shared by the nodes of a cluster)."""
    install = hashlib.sha1(f"{Path(sys.prefix).resolve()}@{socket.gethostname()}".encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "sat_video" / "torch_extensions" / install


@dataclass(frozen=True)
class BuildLock:
    path: Path
    age_s: float
    builders: tuple[int, ...] | None
    """PIDs of processes working in the lock's build folder (ninja and the compilers run there); ``None`` where
    ``/proc`` cannot tell."""


def _processes_in(folder: Path) -> tuple[int, ...] | None:
    """PIDs whose working directory is ``folder``; ``None`` where ``/proc`` cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "cwd").exists():
        return None
    target = os.path.realpath(folder)
    pids = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == target:
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or another user's process (it cannot build in this user's folder)
                continue
    return tuple(pids)


def _read_lock(path: Path) -> BuildLock | None:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:  # the build finished meanwhile
        return None
    return BuildLock(path, age, _processes_in(path.parent))


def find_build_locks(root: Path) -> list[BuildLock]:
    """The build locks under ``root`` (one level of op folders), with their age and builders."""
    if not root.is_dir():
        return []
    return [lock for path in sorted(root.glob(f"*/{LOCK_NAME}")) if (lock := _read_lock(path)) is not None]


def clear_stale_build_locks(root: Path) -> list[Path]:
    """Remove the locks under ``root`` that no live build holds; returns them.

    Raises:
        BuildLockError: a lock whose builder cannot be known (no ``/proc``); the message names the file.
    """
    removed = []
    for lock in find_build_locks(root):
        if not lock.builders and lock.age_s < STARTING_BUILD_S:
            time.sleep(STARTING_BUILD_S - lock.age_s)
            lock = _read_lock(lock.path)
        if lock is None:
            continue
        if lock.builders is None:
            raise BuildLockError(
                f"{lock.path} is the lock of a build of {lock.path.parent.name} started {lock.age_s:.0f} s ago, and this "
                f"system cannot tell whether that build is still running. If no other process is building it, delete "
                f"the file and start again (an interrupted build leaves it behind, and every later build waits for it)"
            )
        if lock.builders:
            logger.warning("%s is being built by process %s; DeepSpeed waits for that build to finish",
                           lock.path.parent.name, ", ".join(map(str, lock.builders)))
            continue
        lock.path.unlink(missing_ok=True)
        logger.warning("removed %s: an interrupted build of %s left it %.0f s ago and no process is building there "
                       "(the op is rebuilt when needed)", lock.path, lock.path.parent.name, lock.age_s)
        removed.append(lock.path)
    return removed


def skip_shm_op() -> None:
    """Tell DeepSpeed that its shared-memory all-reduce op cannot be built, so that its communication backend
    starts without compiling it (training never calls the one collective that uses it)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        # DeepSpeed probes op compatibility once and keeps the dict; its backend builds the op only where it says True.
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def prepare_native_builds() -> None:
    """Before DeepSpeed starts: private build folder (unless ``TORCH_EXTENSIONS_DIR`` is set), no shm op, no stale
    locks."""
    root = Path(os.environ.get(EXTENSIONS_DIR_ENV) or private_extensions_dir())
    os.environ[EXTENSIONS_DIR_ENV] = str(root)  # where torch, and so DeepSpeed, builds ops in this process
    skip_shm_op()
    clear_stale_build_locks(root)
