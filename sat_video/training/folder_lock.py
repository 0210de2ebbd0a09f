"""One folder, one job: the lock a job holds on the folder it writes, from its start to its exit.

A second job started on a folder whose lock a live job holds is refused before it reads or writes anything there
(:class:`~sat_video.common.errors.FolderInUseError`, exit status 2), instead of interleaving its checkpoints and logs
with the first one's. A run folder holds its own lock (``<save>/.lock``); a folder renamed into place when complete (a
latent cache) is locked through a file beside it (:func:`lock_file_beside`).

* Taking the lock is atomic across the processes and hosts that share a file system: the file is created with
  ``O_CREAT | O_EXCL``. A stale lock is replaced (atomic rename) by the one taker that created the claim file on that
  very record (``O_EXCL`` again), so two takers cannot both win, and the lock file never goes missing meanwhile.
* The holder refreshes the file's modification time every :data:`REFRESH_S` from a daemon thread.
* A lock is stale when its holder ran in this machine's PID space (same boot, same PID namespace) and that process is
  gone (no such PID, a zombie, or the PID of a process started at another time), or when it has not been refreshed
  for ``stale_s`` (``train.lock_stale_s``): the only rule that can judge a holder on another host.
* Under torchrun, rank 0 holds the lock for the whole job and tells every rank the outcome
  (:func:`hold_folder_lock`), so that a refusal ends all ranks together with the same message.
* A restart of a torchrun job (``--max-restarts``) finds the lock of its previous attempt, whose workers the elastic
  agent stopped before starting new ones: on the same host their PID is gone; on another host (rank 0 moved) the new
  attempt waits for that lock to go stale rather than being refused, and is refused if it is refreshed meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sat_video.common.errors import FolderInUseError, SatVideoError
from sat_video.common.files import atomic_write
from sat_video.training.distributed import broadcast_object

logger = logging.getLogger(__name__)

REFRESH_S = 30.0
"""How often the holder refreshes its lock; ``train.lock_stale_s`` is at least twice this, so that one late refresh
never makes a live lock look stale."""
POLL_S = 0.2
WRITING_S = 2.0
"""A taker writes its record right after creating the file; an empty or unreadable lock younger than this may be one
being written, so it is read again."""


def _pid_space() -> str | None:
    """Where a PID names the same process as in this one: this boot of this machine and this PID namespace; ``None``
    where ``/proc`` cannot tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, ``/proc/<pid>/stat`` field 22); ``None`` when no live
    process has that PID (a zombie is not live: it is a killed process its parent has not reaped yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: what the lock file records, and what the other ranks of the holder's job learn."""

    host: str
    pid: int
    since: float
    """When the job took the lock (its start), seconds since the epoch."""
    command: str
    pid_space: str | None
    """Where ``pid`` means this process (:func:`_pid_space`); only there can a taker check whether it lives."""
    pid_start: int | None
    """When ``pid`` started (:func:`_process_start`): a PID reused by a later process does not count as the holder."""
    torchrun_run: str | None
    torchrun_attempt: int | None
    """``TORCHELASTIC_RUN_ID`` and ``TORCHELASTIC_RESTART_COUNT`` of a torchrun worker."""

    @classmethod
    def this_process(cls) -> LockHolder:
        pid_space = _pid_space()
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        return cls(socket.gethostname(), os.getpid(), time.time(), shlex.join(sys.orig_argv), pid_space,
                   _process_start(os.getpid()) if pid_space else None, os.environ.get("TORCHELASTIC_RUN_ID"),
                   None if attempt is None else int(attempt))

    @classmethod
    def parse(cls, raw: bytes) -> LockHolder | None:
        """The holder a lock file records; ``None`` for an empty or damaged record."""
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            return None

    def record(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        here = " (this host)" if self.host == socket.gethostname() else ""
        return f"process {self.pid} on host {self.host}{here}, started {started}, command: {self.command}"

    def checkable_here(self) -> bool:
        """Whether this process can tell if the holder's process lives: both in the same PID space."""
        return self.pid_space is not None and self.pid_space == _pid_space()

    def is_gone(self) -> bool:
        return self.checkable_here() and _process_start(self.pid) != self.pid_start

    def is_earlier_attempt_of(self, other: LockHolder) -> bool:
        """Whether this holder is a worker of an earlier attempt of ``other``'s torchrun job."""
        return (self.torchrun_run is not None and self.torchrun_run == other.torchrun_run
                and None not in (self.torchrun_attempt, other.torchrun_attempt)
                and self.torchrun_attempt < other.torchrun_attempt)


@dataclass(frozen=True)
class _Seen:
    """A lock file as read: its bytes, their holder (``None`` if unreadable) and its last refresh."""

    raw: bytes
    holder: LockHolder | None
    refreshed: float

    @property
    def age_s(self) -> float:
        return time.time() - self.refreshed

    def holder_description(self) -> str:
        return self.holder.describe() if self.holder else "a job that left no readable record (the file is damaged)"


def _read(file: Path) -> _Seen | None:
    """The lock in ``file``, or ``None`` if there is none."""
    try:
        with open(file, "rb") as handle:
            raw = handle.read()
            refreshed = os.fstat(handle.fileno()).st_mtime  # after open: fresh on NFS (close-to-open consistency)
    except FileNotFoundError:
        return None
    return _Seen(raw, LockHolder.parse(raw), refreshed)


def _create(file: Path, record: bytes) -> bool:
    """Create ``file`` holding ``record``; ``False`` if it exists (atomic on every host sharing the file system)."""
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    try:
        os.write(fd, record)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def lock_file_beside(folder: Path) -> Path:
    """``<parent>/.<name>.lock``: the lock of a folder that is renamed into place when complete (a latent cache), which
    cannot hold its own lock before it exists."""
    return folder.parent / f".{folder.name}.lock"


class FolderLock:
    """The lock in ``file`` on the folder a job writes. ``acquire()``, then ``release()`` at exit.

    Args:
        file: the lock file (``RunFolder.lock_file``, :func:`lock_file_beside`).
        folder: how the user named the folder, for messages (``train.save=runs/x``, ``--out /data/cache``).
        stale_s: a lock not refreshed for this long is stale (``train.lock_stale_s``).
    """

    def __init__(self, file: Path, folder: str, stale_s: float, refresh_s: float = REFRESH_S):
        self.file, self.folder, self.stale_s, self.refresh_s = Path(file), folder, stale_s, refresh_s
        self._record = b""
        self._created_folder = False
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def acquire(self) -> LockHolder:
        """Take the lock for this process, taking over a stale one with a warning that names it.

        Raises:
            FolderInUseError: a live job holds it; nothing in the folder was created or changed.
        """
        me = LockHolder.this_process()
        self._record = me.record()
        self._created_folder = not self.file.parent.exists()
        self.file.parent.mkdir(parents=True, exist_ok=True)
        waiting_for: _Seen | None = None
        while not _create(self.file, self._record):
            seen = _read(self.file)
            if seen is None:  # released meanwhile
                continue
            if seen.holder is None and seen.age_s < WRITING_S:
                time.sleep(POLL_S)
                continue
            stale = self._stale_reason(seen)
            if stale is not None:
                if self._take_over(seen):
                    logger.warning("took over %s, the lock of %s: %s", self.file, seen.holder_description(), stale)
                    break
                continue
            if not self._waits_for(seen, waiting_for, me):
                raise FolderInUseError(self._refusal(seen))
            waiting_for = waiting_for or seen
            time.sleep(POLL_S)
        self._stop.clear()
        self._refresher = threading.Thread(target=self._refresh, name="folder-lock-refresh", daemon=True)
        self._refresher.start()
        return me

    def release(self) -> None:
        """Stop refreshing and remove the lock (and the folder, if taking the lock created it and it stayed empty)."""
        if self._refresher is None:
            return
        self._stop.set()
        self._refresher.join()
        self._refresher = None
        seen = _read(self.file)
        if seen is None or seen.raw != self._record:
            logger.error(self._lost(seen))
            return
        self.file.unlink()
        if self._created_folder:
            with contextlib.suppress(OSError):  # not empty: the job wrote there
                self.file.parent.rmdir()

    def _stale_reason(self, seen: _Seen) -> str | None:
        if seen.age_s > self.stale_s:
            return f"not refreshed for {seen.age_s:.0f} s (train.lock_stale_s={self.stale_s:g})"
        if seen.holder is not None and seen.holder.is_gone():
            return f"process {seen.holder.pid} has ended"
        return None

    def _take_over(self, seen: _Seen) -> bool:
        """Replace the stale lock ``seen`` with this job's, under a claim on that very record that only one taker can
        create: the lock file never goes missing, so a job starting meanwhile cannot slip in, and of several takers of
        one stale lock exactly one wins (the others then find its live lock)."""
        claim = self.file.with_name(f"{self.file.name}.takeover-{hashlib.sha1(seen.raw).hexdigest()[:16]}")
        if not _create(claim, self._record):
            claimed = _read(claim)
            if claimed is not None and self._stale_reason(claimed) is not None:  # a taker that died while taking over
                claim.unlink(missing_ok=True)
            else:
                time.sleep(POLL_S)
            return False
        try:
            now = _read(self.file)
            if now is None or now.raw != seen.raw:  # released meanwhile, or taken over by a taker whose claim just ended
                return False
            atomic_write(self.file, lambda tmp: tmp.write_bytes(self._record))
            return True
        finally:
            claim.unlink()

    def _waits_for(self, seen: _Seen, waiting_for: _Seen | None, me: LockHolder) -> bool:
        """Whether to wait for ``seen`` to go stale instead of refusing: the lock of this torchrun job's earlier
        attempt on a host where its process cannot be checked, not refreshed since this attempt first saw it."""
        if seen.holder is None or seen.holder.checkable_here() or not seen.holder.is_earlier_attempt_of(me):
            return False
        if waiting_for is None:
            logger.warning("%s is held by %s, of an earlier attempt of this torchrun job (stopped by its elastic agent "
                           "before this attempt started); waiting until it has not been refreshed for "
                           "train.lock_stale_s=%g s (%.0f s ago now)", self.file, seen.holder.describe(), self.stale_s,
                           seen.age_s)
            return True
        return seen.raw == waiting_for.raw and seen.refreshed == waiting_for.refreshed

    def _refusal(self, seen: _Seen) -> str:
        return (
            f"{self.folder} is in use by another job: {self.file} is held by {seen.holder_description()}; refreshed "
            f"{seen.age_s:.0f} s ago. This job stops without touching the folder (two jobs writing it would interleave "
            f"their checkpoints and logs). Wait for that job to end or stop it, or choose another folder. The lock of a "
            f"job that is gone is taken over at start: at once on the host where it ran, from other hosts once it has "
            f"not been refreshed for train.lock_stale_s={self.stale_s:g} s"
        )

    def _lost(self, seen: _Seen | None) -> str:
        now = "deleted" if seen is None else f"taken over as stale by {seen.holder_description()}"
        return f"{self.file} is no longer this job's lock ({now}); another job may now write {self.folder}"

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                seen = _read(self.file)
                if seen is None or seen.raw != self._record:
                    logger.error(self._lost(seen))
                    return
                os.utime(self.file)
            except OSError as err:  # a file system that failed for a moment; the next refresh may succeed
                logger.warning("could not refresh %s: %s", self.file, err)


@contextlib.contextmanager
def hold_folder_lock(lock: FolderLock, is_main: bool) -> Iterator[LockHolder]:
    """Hold ``lock`` for the whole job around the block; collective (every rank enters it).

    Rank 0 takes the lock and every rank learns the outcome: all go on knowing the holder, or all raise rank 0's
    error (:class:`~sat_video.common.errors.FolderInUseError` for a live holder), so that none waits for the others.
    """
    holder = None
    if is_main:
        try:
            holder = lock.acquire()
        except Exception as err:
            shared = err if isinstance(err, SatVideoError) else RuntimeError(f"rank 0 failed taking {lock.file}: {err!r}")
            broadcast_object(shared)
            raise
    holder = broadcast_object(holder)
    if isinstance(holder, Exception):
        raise holder
    try:
        yield holder
    finally:
        if is_main:
            lock.release()
