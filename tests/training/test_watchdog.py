"""The watchdog ends a process that stops making progress, with a message naming the stage and every stack."""

import subprocess
import sys
import time

import pytest

from sat_video.training.watchdog import HANG_EXIT_CODE

SCRIPT = """
import sys, time
from sat_video.training.watchdog import Watchdog

def read_from_stuck_storage():
    time.sleep(60)

with Watchdog(1.0, 3.0, sys.argv[1], rank=5, exit_grace_s=0) as watchdog:
    watchdog.enter("validation", slow=True)
    time.sleep(2.0)  # within the slow allowance
    watchdog.completed("validation at iteration 4")
    watchdog.enter("data loading")
    read_from_stuck_storage()
"""


@pytest.mark.slow
def test_a_stuck_stage_ends_the_process_with_its_name_and_every_stack(tmp_path):
    dump = tmp_path / "run" / "hang-rank5.txt"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(dump)], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == HANG_EXIT_CODE, proc.stderr
    assert 3.0 < elapsed < 20  # 2 s of slow stage, then 1 s of limit (plus start-up)
    message = "rank 5 made no progress for longer than train.hang_timeout_s=1 s while in stage 'data loading'"
    assert message in proc.stderr and "last completed: validation at iteration 4" in proc.stderr
    assert "read_from_stuck_storage" in proc.stderr
    text = dump.read_text()
    assert message in text and "read_from_stuck_storage" in text and "Thread 0x" in text
