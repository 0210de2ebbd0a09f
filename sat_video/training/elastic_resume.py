"""Resuming a checkpoint written with another process layout (``train.resume_layout``).

A checkpoint holds each data-parallel rank's ZeRO partition of the optimizer, RNG state and data position, so it loads
as written only at the ``[D, S]`` that wrote it (D data-parallel x S sequence-parallel processes; under S > 1 ZeRO
partitions over all D x S ranks).

* ``strict`` (the default): another layout is refused before anything is loaded or written, by every rank alike
  (each reads the same file), naming both layouts and both ways on.
* ``elastic``: DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``: one file per parameter
  and state, unpartitioned) is made once, beside the checkpoint (``<iteration>/universal``, written under a temporary
  name and renamed when complete, reused by later resumes), and the engine loads it re-partitioned for this layout
  (``checkpoint.load_universal``): weights, Adam moments, the loss scale, the LR schedule position and the iteration carry
  over. Each data-parallel rank that existed takes its RNG state; a new one keeps its fresh seeding. The data position
  carries over in samples: the epoch and the set of samples already drawn in it are kept
  (:attr:`~sat_video.training.checkpoint.LoopState.data_drawn`), and the rest of the epoch is dealt to the new ranks
  (:class:`~sat_video.data.sampler.ClipBatchSampler`). Callbacks take rank 0's state.

Universal checkpoints cover ZeRO-1 and 2 (either way, and across the two); ZeRO-0 keeps the optimizer outside ZeRO's
partitions and ZeRO-3 writes its weights as partitions plus our consolidated SAT file, which DeepSpeed's converter
does not read apart: both are refused in elastic mode, naming the way on (``train.init_checkpoint``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sat_video.common.errors import CheckpointError
from sat_video.formats.sat_checkpoint import MODEL_STATES
from sat_video.training.distributed import DistributedEnv, barrier
from sat_video.training.run_folder import trainer_state_file
from sat_video.training.sequence_parallel import ParallelLayout

logger = logging.getLogger("sat_video.train")

UNIVERSAL = "universal"
"""The universal checkpoint's folder inside the checkpoint it was converted from (DeepSpeed's ``tag``)."""
CONVERTING = ".tmp-universal"
ELASTIC_ZERO_STAGES = (1, 2)
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class SavedLayout:
    """The process layout and ZeRO stage of the run that wrote checkpoint ``folder``."""

    folder: Path
    data_size: int
    sequence_size: int

    @classmethod
    def read(cls, folder: Path) -> SavedLayout:
        """From rank 0's trainer state (which every run has); a checkpoint written before the layout was recorded had
        every process data-parallel: one state file per process."""
        state_file = trainer_state_file(folder, 0)
        if not state_file.is_file():
            raise CheckpointError(f"{state_file} is missing: {folder} is not a complete checkpoint of sat_video's trainer "
                                  f"(to take its weights only, start a new run with train.init_checkpoint={folder})")
        layout = torch.load(state_file, map_location="cpu", weights_only=True)["loop"].get("layout")
        if layout:
            return cls(folder, int(layout[0]), int(layout[1]))
        return cls(folder, len(list(folder.glob(trainer_state_file(Path(), "*").name))), 1)

    @property
    def world_size(self) -> int:
        return self.data_size * self.sequence_size

    def describe(self) -> str:
        return f"{self.data_size} data-parallel x {self.sequence_size} sequence-parallel"

    def zero_stage(self) -> int:
        """From DeepSpeed's own record of its config (ZeRO-3: its partitioned model files, beside our SAT file)."""
        if (self.folder / ZERO3_MODEL_STATES).is_file():
            return 3
        states = torch.load(self.folder / MODEL_STATES, map_location="cpu", weights_only=False, mmap=True)
        return int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))


def check_resume_layout(mode: str, folder: Path, layout: ParallelLayout, zero_stage: int) -> ElasticResume | None:
    """How to resume ``folder`` on ``layout`` under ZeRO ``zero_stage``: ``None`` as written (the same layout), an
    :class:`ElasticResume` (``mode`` elastic, another layout or ZeRO stage), or refused (:class:`CheckpointError`).
    Reads only; every rank decides alike."""
    saved = SavedLayout.read(folder)
    same_layout = (saved.data_size, saved.sequence_size) == (layout.data_size, layout.sequence_size)
    if same_layout and mode == "strict":
        return None
    if not same_layout and mode == "strict":
        raise CheckpointError(
            f"{folder} was written by {saved.describe()} processes, this run has {layout.describe()}: resuming as written "
            f"needs the same layout (ZeRO's optimizer partitions, the data order and the random draws follow the "
            f"data-parallel rank). Set train.resume_layout=elastic to continue it on this layout (weights, optimizer "
            f"state, LR schedule and data position carry over; not bit-identical to an uninterrupted run), or start a new "
            f"run with train.init_checkpoint={folder} (weights only)"
        )
    saved_stage = saved.zero_stage()
    if same_layout and saved_stage == zero_stage:
        return None
    for which, stage in (("the checkpoint", saved_stage), ("this run", zero_stage)):
        if stage not in ELASTIC_ZERO_STAGES:
            raise CheckpointError(
                f"train.resume_layout=elastic: {which} uses ZeRO stage {stage} ({folder}: {saved.describe()}, ZeRO-"
                f"{saved_stage}; this run: {layout.describe()}, ZeRO-{zero_stage}); DeepSpeed's universal checkpoints, "
                f"which re-partition the optimizer state, are used here for ZeRO stages "
                f"{' and '.join(map(str, ELASTIC_ZERO_STAGES))} only. Resume with the layout and stage it was written "
                f"with, or start a new run with train.init_checkpoint={folder} (weights only)"
            )
    return ElasticResume(saved, saved_stage, layout, zero_stage)


class ElasticResume:
    """Resuming ``saved`` (ZeRO ``saved_stage``) on ``layout`` (ZeRO ``zero_stage``) through a universal checkpoint."""

    def __init__(self, saved: SavedLayout, saved_stage: int, layout: ParallelLayout, zero_stage: int):
        self.saved, self.saved_stage, self.layout, self.zero_stage = saved, saved_stage, layout, zero_stage

    @property
    def folder(self) -> Path:
        return self.saved.folder

    @staticmethod
    def deepspeed_config(config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with the engine told to load universal checkpoints (set when it is built)."""
        return {**config, "checkpoint": {**config.get("checkpoint", {}), "load_universal": True}}

    def universal_folder(self, env: DistributedEnv) -> Path:
        """The universal checkpoint beside ``folder``, converted on the main rank the first time (collective)."""
        target = self.folder / UNIVERSAL
        if env.is_main and not target.is_dir():
            self._convert(target)
        barrier()
        if not (target / MODEL_STATES).is_file():
            raise CheckpointError(f"{target} is incomplete (no {MODEL_STATES}); delete it and resume again to convert "
                                  f"{self.folder} anew")
        return target

    def _convert(self, target: Path) -> None:
        from deepspeed.checkpoint import ds_to_universal

        staging = self.folder / CONVERTING
        shutil.rmtree(staging, ignore_errors=True)  # a conversion that was killed
        logger.info("converting %s to DeepSpeed's universal checkpoint (once; kept in %s for later resumes)", self.folder,
                    target)
        start = time.perf_counter()
        # In this process and without worker processes: forking a rank with live process-group threads is unsafe.
        args = Namespace(input_folder=str(self.folder), output_folder=str(staging / UNIVERSAL), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                ds_to_universal.main(args)
        except Exception as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"DeepSpeed could not convert {self.folder} to a universal checkpoint ({error!r}); its "
                                  f"output:\n{printed.getvalue()[-2000:]}") from error
        for file in (staging / UNIVERSAL).rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        os.replace(staging / UNIVERSAL, target)
        shutil.rmtree(staging)
        logger.info("universal checkpoint written in %.1f s", time.perf_counter() - start)

    def trainer_state(self, rank: int) -> dict[str, Any]:
        """This rank's named parts, from the saved ranks' files: rank 0's loop (the skipped files of every rank on rank
        0 only) and callbacks, and the RNG of the saved rank with this data-parallel rank, if there was one (else no
        ``rng``: a new rank keeps its fresh seeding)."""
        files = [trainer_state_file(self.folder, r) for r in range(self.saved.world_size)]
        missing = [str(file) for file in files if not file.is_file()]
        if missing:
            raise CheckpointError(f"{self.folder} was written by {self.saved.describe()} processes but lacks "
                                  f"{', '.join(missing)}; resume from another checkpoint")
        saved = [torch.load(file, map_location="cpu", weights_only=True) for file in files]
        state = {name: part for name, part in saved[0].items() if name != "rng"}
        skipped = sorted({tuple(item) for rank_state in saved for item in rank_state["loop"].get("skipped_files", [])})
        state["loop"] = {**saved[0]["loop"], "skipped_files": [list(item) for item in skipped] if rank == 0 else []}
        if self.layout.data_rank < self.saved.data_size:
            state["rng"] = saved[self.layout.data_rank * self.saved.sequence_size]["rng"]
        return state

    def describe(self) -> str:
        return (f"resumed {self.folder} elastically: written by {self.saved.describe()} processes under ZeRO-"
                f"{self.saved_stage}, now {self.layout.describe()} under ZeRO-{self.zero_stage}. Weights, optimizer state, "
                f"LR schedule, iteration and the samples drawn this epoch carry over, but the run is not bit-identical to "
                f"an uninterrupted one: the rest of the epoch is dealt to the ranks anew (other samples per batch, other "
                f"random draws on new ranks) and gradients are reduced over another number of ranks, in another order")
