"""A watchdog on the training loop: a run that stops making progress ends, with every thread's stack and a
message naming what it was doing, instead of waiting for ever.

The loop tells the watchdog which stage it is in (data loading, forward/backward, a collective, saving,
validation) and when a step, a checkpoint or a validation completes. A thread checks twice a second; when
nothing has completed within the allowed time it writes the message and ``faulthandler``'s dump of every thread
to the log (stderr) and to ``<save>/hang-rank<r>.txt``, waits a few seconds so that the other ranks, stuck in
the same collective, can write theirs before the launcher tears them down, and ends the process with
:data:`HANG_EXIT_CODE`. The main thread may be blocked in C (a collective, a read from stuck storage), where no
exception can reach it, so the thread ends the process itself. Checkpoints are committed atomically, so the last
one stays loadable: run the same command with ``train.resume=auto``.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

HANG_EXIT_CODE = 3
POLL_S = 0.5
EXIT_GRACE_S = 5.0

HINTS = {
    "data loading": "a data file on stuck storage, or a data-loader worker that deadlocked",
    "forward/backward": "another rank that stopped (it joins DeepSpeed's gradient reduction here), or a stuck kernel",
    "optimizer step": "another rank that stopped (ZeRO reduces and gathers here)",
    "collective (loss all-reduce)": "another rank that stopped or crashed",
    "collective (gathering skipped files)": "another rank that stopped or crashed",
    "callbacks": "a callback's own work after the step (sat_video/training/callbacks.py), or a rank that stopped",
    "saving checkpoint": "a full or stuck file system, or another rank that stopped",
    "validation": "another rank that stopped, or sampling slower than train.slow_stage_timeout_s allows",
    "start-up": "a stuck file system (checkpoint loading) or a rank that did not join",
}


class Watchdog:
    """Ends the process when no step, checkpoint or validation completes in time.

    Args:
        timeout_s: allowed time between completions (``train.hang_timeout_s``); 0 turns the watchdog off.
        slow_timeout_s: allowed instead (if longer) when the current stretch includes a slow stage (start-up, the
            first step, validation; ``train.slow_stage_timeout_s``).
        dump_file: where the message and the stacks are written besides the log.
        rank: this process's rank, for the message.
        exit_grace_s: wait between the dump and the exit, for the other ranks' dumps.
    """

    def __init__(self, timeout_s: float, slow_timeout_s: float, dump_file: Path, rank: int = 0,
                 exit_grace_s: float = EXIT_GRACE_S):
        self.timeout_s, self.slow_timeout_s = timeout_s, slow_timeout_s
        self.dump_file, self.rank, self.exit_grace_s = Path(dump_file), rank, exit_grace_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stage, self._slow, self._since, self._last = "start-up", True, time.monotonic(), "nothing yet"

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def __enter__(self) -> Watchdog:
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="sat_video-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def enter(self, stage: str, *, slow: bool = False) -> None:
        """The loop is now in ``stage``; ``slow``: this stretch may take ``slow_timeout_s``."""
        with self._lock:
            self._stage = stage
            self._slow = self._slow or slow

    def completed(self, what: str) -> None:
        """A step, checkpoint or validation finished: the clock starts again, at the normal allowance."""
        with self._lock:
            self._since, self._slow, self._last = time.monotonic(), False, what

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                idle, stage, last, slow = time.monotonic() - self._since, self._stage, self._last, self._slow
            slow_applies = slow and self.slow_timeout_s > self.timeout_s
            key, allowed = ("slow_stage_timeout_s", self.slow_timeout_s) if slow_applies else ("hang_timeout_s", self.timeout_s)
            if idle > allowed:
                self._fire(stage, last, f"train.{key}={allowed:g}")

    def _fire(self, stage: str, last: str, limit: str) -> None:
        message = (
            f"sat_video watchdog: rank {self.rank} made no progress for longer than {limit} s while in stage "
            f"'{stage}'; last completed: {last}. Likely causes: {HINTS.get(stage, 'see the stacks')}. Every thread's "
            f"stack follows and is in {self.dump_file}. Checkpoints are intact: run the same command with "
            f"train.resume=auto to continue from the last one."
        )
        try:
            self.dump_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dump_file, "w") as handle:
                handle.write(message + "\n\n")
                handle.flush()
                faulthandler.dump_traceback(handle, all_threads=True)
        except OSError as err:
            message += f" (could not write {self.dump_file}: {err})"
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        sys.stderr.flush()
        time.sleep(self.exit_grace_s)
        os._exit(HANG_EXIT_CODE)
