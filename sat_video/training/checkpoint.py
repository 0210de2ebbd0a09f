"""What a checkpoint holds, and how a run writes and reads it back (the folder's layout: :mod:`run_folder`).

A checkpoint is DeepSpeed's engine (weights, optimizer, LR schedule, in DeepSpeed's own files) plus one
``trainer_state_rank<r>.pt`` per rank: ``{name: part.state_dict()}`` over named :class:`Stateful` parts,

* ``rng``: every generator a step draws from (:class:`RngState`);
* ``loop``: the counters, the data position and its period (:class:`LoopState`), with the process layout that wrote it;
* one entry per callback, under its name (:class:`~sat_video.training.callbacks.Callback`);

and with ``train.ema`` the average of the trained weights gathered into ``ema_model_states.pt`` for sampling and export
(the average a resume reads is in DeepSpeed's optimizer files, :mod:`~sat_video.training.ema`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sat_video.common.errors import CheckpointError
from sat_video.formats.sat_checkpoint import EMA_STATES, MODEL_STATES
from sat_video.training.distributed import DistributedEnv, barrier
from sat_video.training.run_folder import RunFolder, trainer_state_file
from sat_video.training.sequence_parallel import ParallelLayout

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from sat_video.training.elastic_resume import ElasticResume

logger = logging.getLogger("sat_video.train")

SAVED_AS = {"period": "stage"}
"""LoopState fields saved under another key: checkpoints named them before the code did."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LoopState:
    """Everything besides DeepSpeed's own state and the RNG that an exact resume needs, per rank."""

    iteration: int = 0
    data_position: tuple[int, int] = (0, 0)
    """``(epoch, batch)`` of the next batch in the current period's data."""
    data_drawn: list[int] = field(default_factory=list)
    """Samples of epoch ``data_position[0]`` drawn before its batches were planned on this run's ranks (a resume on
    another number of them, :mod:`~sat_video.training.elastic_resume`); ``batch`` counts from that plan. Empty
    otherwise."""
    nonfinite_streak: int = 0
    skipped_steps: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    period: int = 0
    """Index of the ``train.stages`` entry (:class:`~sat_video.training.progressive.TrainingPeriod`) ``data_position``
    belongs to."""
    data_stream: dict = field(default_factory=dict)
    """With ``data.shards``: this rank's shard stream after the batch before ``data_position`` (cursor, shuffle buffer and
    queues as sample positions: :meth:`~sat_video.data.shard_stream.RankStream.state`). Empty otherwise."""

    def __post_init__(self):  # read back from a checkpoint, tuples are lists
        self.data_position = tuple(self.data_position)
        self.skipped_files = [tuple(item) for item in self.skipped_files]

    def count_step(self, skipped: bool) -> None:
        """One more iteration; ``skipped``: it had a non-finite loss or gradients and changed no weight."""
        self.iteration += 1
        if skipped:
            self.skipped_steps += 1
            self.nonfinite_streak += 1
            logger.warning("iteration %d: non-finite loss or gradients, step skipped (%d in a row)", self.iteration,
                           self.nonfinite_streak)
        else:
            self.nonfinite_streak = 0

    def note_skipped(self, items) -> None:
        """Files found unusable, ``(path, reason)``, each listed once in ``skipped_files.txt`` at the end of the run."""
        self.skipped_files.extend(item for item in items if item not in self.skipped_files)

    def state_dict(self) -> dict[str, Any]:
        return {SAVED_AS.get(f.name, f.name): _as_lists(getattr(self, f.name)) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Fields a checkpoint lacks (written before they existed) take their defaults."""
        saved = {f.name: state[SAVED_AS.get(f.name, f.name)] for f in fields(self) if SAVED_AS.get(f.name, f.name) in state}
        vars(self).update(vars(LoopState(**saved)))


def _as_lists(value: Any) -> Any:
    """Tuples as lists, nested: the plain types checkpoints have always held."""
    return [_as_lists(item) for item in value] if isinstance(value, (list, tuple)) else value


class RngState:
    """Every generator a step draws from: the step's own (timesteps, noise, latents), torch's, Python's and CUDA's."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        state = {"generator": self.generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def saved_period(folder: Path | None) -> int:
    """The period a checkpoint was written in (the same on every rank: rank 0's file, which a run on any number of
    processes has), read before the data is built so that only its data is; 0 for a fresh start (a missing state file
    is reported by :meth:`Checkpoints.load`)."""
    state_file = trainer_state_file(folder, 0) if folder is not None else None
    if state_file is None or not state_file.is_file():
        return 0
    return torch.load(state_file, map_location="cpu", weights_only=True)["loop"].get(SAVED_AS["period"], 0)


class Checkpoints:
    """Writes complete checkpoints of a run (collectively: every rank calls :meth:`save`) and resumes from one.

    ``parts``: the named stateful parts of each rank's trainer state file, ``loop`` and ``rng`` among them.
    ``ema_weights``: gathers the average of the weights (collective; filled on the main rank), when there is one.
    ``companions``: further engines of the run (a GAN's discriminator), each saved whole into ``<iteration>/<name>/``.
    ``exports``: writes files for users into a checkpoint's folder before it is committed (main rank), e.g. a VAE's
    diffusers folder.
    """

    def __init__(self, run_folder: RunFolder, engine: DeepSpeedEngine, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, parts: Mapping[str, Stateful], layout: ParallelLayout,
                 env: DistributedEnv, keep_last: int | None,
                 ema_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
                 companions: Mapping[str, DeepSpeedEngine] = {}, exports: Callable[[Path], None] | None = None):
        self.run_folder, self.engine, self.optimizer, self.scheduler = run_folder, engine, optimizer, scheduler
        self.parts, self.layout, self.env, self.keep_last = dict(parts), layout, env, keep_last
        self.ema_weights, self.companions, self.exports = ema_weights, dict(companions), exports

    def save(self, iteration: int) -> Path:
        """Stage every rank's part of checkpoint ``iteration``, then commit it; returns its folder."""
        staging = self.run_folder.staging(iteration)
        if self.env.is_main:
            staging.parent.mkdir(parents=True, exist_ok=True)
        barrier()
        self.engine.save_checkpoint(
            str(self.run_folder.path), tag=staging.name, client_state={"iteration": iteration}, save_latest=False
        )
        for name, companion in self.companions.items():
            companion.save_checkpoint(str(staging), tag=name, client_state={"iteration": iteration}, save_latest=False)
        if self.engine.zero_optimization_partition_weights():
            # ZeRO-3 writes only partitions; gather the whole DiT into SAT's file so every loader can read it.
            module = self.engine._zero3_consolidated_16bit_state_dict()
            if self.env.is_main:
                torch.save({"module": module, "iteration": iteration}, staging / MODEL_STATES)
        if self.ema_weights is not None:
            average = self.ema_weights()
            if self.env.is_main:
                torch.save({"module": average, "iteration": iteration}, staging / EMA_STATES)
        if self.exports is not None and self.env.is_main:
            self.exports(staging)
        state = {name: part.state_dict() for name, part in self.parts.items()}
        state["loop"]["layout"] = [self.layout.data_size, self.layout.sequence_size]  # checked on resume
        torch.save(state, trainer_state_file(staging, self.env.rank))
        barrier()
        final = self.run_folder.path / str(iteration)
        if self.env.is_main:
            self.run_folder.commit(iteration, self.keep_last)
            logger.info("saved checkpoint %s", final)
        barrier()
        return final

    def load(self, folder: Path, elastic: ElasticResume | None = None) -> None:
        """Resume from ``folder``: the engine, then every part; ``elastic``: written with another layout or ZeRO stage
        (the layout was checked before the engine was built, :func:`~sat_video.training.elastic_resume.check_resume_layout`)."""
        state_file = trainer_state_file(folder, self.env.rank)
        if elastic is None and not state_file.is_file():
            raise CheckpointError(
                f"{state_file} is missing: {folder} was written by a run with another number of processes "
                f"(resuming needs the same number of processes, now {self.env.world_size})"
            )
        if elastic is None:
            path, _ = self.engine.load_checkpoint(
                str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        else:
            universal = elastic.universal_folder(self.env)
            # The universal load restores what the optimizer holds; frozen weights (LoRA's base) and buffers come from
            # the module file, as in a load as written.
            module = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=False, mmap=True)["module"]
            self.engine.load_module_state_dict({"module": module}, strict=True)
            path, _ = self.engine.load_checkpoint(
                str(folder), tag=universal.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}")
        for name, companion in self.companions.items():
            if not (folder / name).is_dir():
                raise CheckpointError(f"{folder / name} is missing: the run that wrote {folder} had no {name}; start a new "
                                      f"run from its weights instead")
            loaded, _ = companion.load_checkpoint(str(folder), tag=name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {folder / name}")
        # The optimizer state carries the LR of the saved step; take it from the schedule of this config, which
        # may extend the run (a larger train.train_iters) or change its decay.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr
        if elastic is None:
            saved = torch.load(state_file, map_location="cpu", weights_only=True)
        else:
            saved = elastic.trainer_state(self.env.rank)
            saved.setdefault("rng", self.parts["rng"].state_dict())  # a new data-parallel rank keeps its own seeding
        for name, part in self.parts.items():
            if name not in saved:
                raise CheckpointError(f"{state_file} holds no '{name}' state (it holds: {', '.join(saved)}): the run that "
                                      f"wrote it had no '{name}' callback; to add one, start a new run with "
                                      f"train.init_checkpoint={folder} (weights only)")
            part.load_state_dict(saved[name])
