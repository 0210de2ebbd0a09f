"""One training job in this process, whatever it trains (``tools/train_video.py``, ``tools/train_vae.py``): the watchdog,
the process group, the run folder's lock, opening the folder, and a clean end."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig, OmegaConf

from sat_video.common.files import atomic_write
from sat_video.training.checkpoint import LoopState
from sat_video.training.distributed import DistributedEnv, barrier, init_distributed, shutdown
from sat_video.training.folder_lock import FolderLock, hold_folder_lock
from sat_video.training.run_folder import RunFolder
from sat_video.training.watchdog import Watchdog

logger = logging.getLogger("sat_video.train")


class JobTrainer(Protocol):
    def run(self) -> LoopState: ...

    def close(self) -> None: ...


def run_job(cfg: DictConfig, make_trainer: Callable[[DistributedEnv, Watchdog], JobTrainer]) -> LoopState:
    """Run ``make_trainer(env, watchdog).run()`` as one rank of a ``torchrun`` job (or a single process), with
    ``train.save`` locked from before anything in it is read until every rank is done, and leave no process group
    behind."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", 0))  # the watchdog also watches joining the process group
    run_folder = RunFolder(cfg.train.save)
    watch = Watchdog(cfg.train.hang_timeout_s, cfg.train.slow_stage_timeout_s, run_folder.hang_file(rank), rank)
    with watch:
        env = init_distributed(cfg.train.collective_timeout_s)
        if not env.is_main:
            logging.getLogger("sat_video").setLevel(logging.WARNING)
        try:
            lock = FolderLock(run_folder.lock_file, f"train.save={cfg.train.save}", cfg.train.lock_stale_s)
            with hold_folder_lock(lock, env.is_main):
                trainer = make_trainer(env, watch)
                try:
                    return trainer.run()
                finally:
                    trainer.close()
                    del trainer  # its engine and model hold the process groups, which shutdown() must see go
        finally:
            shutdown()


def open_run_folder(run_folder: RunFolder, cfg: DictConfig, env: DistributedEnv,
                    check: Callable[[Path | None], None] = lambda resume_from: None) -> Path | None:
    """The checkpoint ``train.resume`` names, or ``None`` for a fresh start in a folder made ready for it; ``check``
    refuses what cannot go on from there, before anything in the folder is written. Writes ``config.yaml``."""
    train = cfg.train
    resume_from = run_folder.resolve_resume(train.resume)
    check(resume_from)
    if env.is_main:
        if resume_from is None:
            # auto found no complete checkpoint: what a run killed before its first save left is replaced
            run_folder.start_fresh(train.overwrite or train.resume == "auto")
        else:
            run_folder.remove_partial()
        if train.resume == "auto":
            logger.info("train.resume=auto: %s", f"resuming from {resume_from}" if resume_from else
                        f"starting fresh in {run_folder.path} (no complete checkpoint there)")
        atomic_write(run_folder.path / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp))
    barrier()
    return resume_from
