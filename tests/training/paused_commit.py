"""``tools/train_video.py`` with a pause before each checkpoint is committed, so that a test can SIGKILL a run whose
checkpoint is staged but not yet committed: ``torchrun ... tests/training/paused_commit.py --base ...`` (with the
repository on ``PYTHONPATH``)."""

import time

from sat_video.training.distributed import exit_process
from sat_video.training.run_folder import RunFolder
from tools.train_video import main

PAUSE_S = 4.0
commit = RunFolder.commit


def paused_commit(self, iteration, keep_last):
    time.sleep(PAUSE_S)
    return commit(self, iteration, keep_last)


if __name__ == "__main__":
    RunFolder.commit = paused_commit
    exit_process(main())
