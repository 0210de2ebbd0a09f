"""The seam where a training feature joins the loop without changing it (EMA of the weights, an evaluation loss, ...).

A feature is one file here with a :class:`Callback` subclass, one section in :mod:`sat_video.training.config`, and the
line in :func:`~sat_video.training.trainer.train` that adds the callback when its section asks for it. The trainer calls
:meth:`Callback.on_step_end` after each optimizer step, before validation and saving, and keeps the callback's
:meth:`Callback.state_dict` in every checkpoint, under its :attr:`Callback.name`, so that a resume is exact for it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from sat_video.training.trainer import Trainer


@dataclass(frozen=True)
class StepEnd:
    """What one optimizer step did."""

    iteration: int
    """1-based, as logged and saved."""
    loss: float | None
    """Mean over the step's micro-batches and ranks; ``None`` for a skipped step."""
    lr: float
    skipped: bool
    """Non-finite loss or gradients: the weights did not change."""


class Callback:
    name: ClassVar[str]
    """Key of the callback's state in each rank's ``trainer_state_rank<r>.pt`` (not ``loop`` or ``rng``)."""

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        """After the optimizer step of ``step.iteration``, on every rank (collectives are allowed)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs, in types ``torch.load(weights_only=True)`` reads back (tensors, numbers, strings,
        lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` gave, when the run resumes."""
