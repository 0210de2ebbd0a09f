"""A training run's folder: complete checkpoints in SAT's layout, committed atomically.

::

    <save>/config.yaml                      the merged config of the run
    <save>/metrics.jsonl                    one JSON line per logged step
    <save>/latest                           iteration of the newest complete checkpoint (written last)
    <save>/<iteration>/mp_rank_00_model_states.pt          DeepSpeed: {"module": model.diffusion_model.*, ...}
    <save>/<iteration>/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   DeepSpeed: optimizer partitions
    <save>/<iteration>/trainer_state_rank<r>.pt            RNG states, data position, counters of rank r
    <save>/hang-rank<r>.txt                 written by the watchdog when rank r stopped making progress
    <save>/.lock                            held by the job writing the folder (sat_video.training.folder_lock)

A checkpoint is written under ``.tmp-<iteration>`` and renamed when every rank has finished, then
``latest`` is replaced; a process killed at any moment leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sat_video.common.errors import CheckpointError, OutputExistsError
from sat_video.common.files import atomic_write
from sat_video.formats.sat_checkpoint import MODEL_STATES

TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
RUN_FILES = ("latest", "metrics.jsonl", "config.yaml", "skipped_files.txt", "wandb_run_id")


def trainer_state_file(folder: Path, rank: int) -> Path:
    return folder / f"trainer_state_rank{rank}.pt"


def hang_file_name(rank: int) -> str:
    return f"hang-rank{rank}.txt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def hang_file(self, rank: int) -> Path:
        return self.path / hang_file_name(rank)

    @property
    def lock_file(self) -> Path:
        """Hidden, so no checkpoint name or clean-up (``start_fresh``, ``remove_partial``) ever matches it."""
        return self.path / LOCK_NAME

    def iterations(self) -> list[int]:
        """Iterations of complete checkpoints on disk, oldest first."""
        if not self.path.is_dir():
            return []
        return sorted(int(p.name) for p in self.path.iterdir() if p.name.isdigit() and (p / MODEL_STATES).is_file())

    def latest(self) -> int | None:
        file = self.path / "latest"
        if not file.is_file():
            return None
        text = file.read_text().strip()
        if not text.isdigit() or not (self.path / text / MODEL_STATES).is_file():
            raise CheckpointError(f"{file} names '{text}', which is not a complete checkpoint in {self.path}")
        return int(text)

    def holds_run(self) -> bool:
        return bool(self.iterations()) or any((self.path / name).exists() for name in ("latest", "metrics.jsonl"))

    def start_fresh(self, overwrite: bool) -> None:
        """Make the folder ready for a new run; an existing run is only deleted when ``overwrite``."""
        if self.holds_run():
            if not overwrite:
                latest = (self.path / "latest").read_text().strip() if (self.path / "latest").is_file() else "none"
                raise OutputExistsError(
                    f"train.save={self.path} already holds a run (latest checkpoint: {latest}). Set train.resume=latest "
                    f"to continue it, choose another train.save, or set train.overwrite=true to delete its checkpoints and logs"
                )
            for iteration in self.iterations():
                shutil.rmtree(self.path / str(iteration))
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            for dump in self.path.glob(hang_file_name("*")):
                dump.unlink()
            for tracker_folder in ("tensorboard", "wandb"):
                shutil.rmtree(self.path / tracker_folder, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.remove_partial()

    def remove_partial(self) -> None:
        """Delete checkpoints that a killed run left half written."""
        if self.path.is_dir():
            for partial in self.path.glob(TMP_PREFIX + "*"):
                shutil.rmtree(partial, ignore_errors=True)

    def staging(self, iteration: int) -> Path:
        return self.path / f"{TMP_PREFIX}{iteration}"

    def commit(self, iteration: int, keep_last: int | None) -> Path:
        """Publish the staged checkpoint ``iteration`` (main rank, after every rank has written its part)."""
        staged, final = self.staging(iteration), self.path / str(iteration)
        for file in staged.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():  # left by a run that went further before being resumed from an earlier step
            shutil.rmtree(final)
        os.replace(staged, final)
        _fsync_dir(self.path)
        atomic_write(self.path / "latest", lambda tmp: tmp.write_text(f"{iteration}\n"))
        if keep_last:
            for old in self.iterations()[:-keep_last]:
                shutil.rmtree(self.path / str(old))
        return final

    def resolve_resume(self, resume: str | None) -> Path | None:
        """The checkpoint folder ``train.resume`` names: ``latest`` of this run, a run folder, or an iteration folder;
        ``None`` for a fresh start (``auto`` in a folder without a complete checkpoint)."""
        if resume is None:
            return None
        if resume == "auto":
            iteration = self.latest()
            if iteration is None and self.iterations():
                raise CheckpointError(
                    f"train.resume=auto: {self.path} holds checkpoints {self.iterations()} but no 'latest' file naming the "
                    f"one to continue from; write the iteration into {self.path / 'latest'} or pass train.resume=<folder>"
                )
            return None if iteration is None else self.path / str(iteration)
        if resume == "latest":
            iteration = self.latest()
            if iteration is None:
                raise CheckpointError(f"train.resume=latest, but {self.path} has no complete checkpoint ('latest' file)")
            return self.path / str(iteration)
        path = Path(resume)
        if (path / MODEL_STATES).is_file():
            return path
        if (path / "latest").is_file():
            return path / str(RunFolder(path).latest())
        raise CheckpointError(
            f"train.resume={resume}: not a checkpoint folder (no {MODEL_STATES}) nor a run folder (no 'latest')"
        )
