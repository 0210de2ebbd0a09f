"""What the benchmark sections run with (:class:`Bench`), what a section is (:class:`Section`), and running them."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sat_video.benchmarks.machine import load_average

if TYPE_CHECKING:
    from sat_video.benchmarks.presets import Preset
    from sat_video.benchmarks.trainer_comparison import ComparisonSetup


@dataclass(frozen=True)
class Commands:
    """The programs some sections time, each in a fresh process (its own start-up, peak RSS and threads). They live
    above the library, so the command line (``tools/bench.py``) hands them down: each is the argument list that
    starts the program, its own arguments to follow."""

    train: tuple[str, ...]
    """``tools/train_video.py``."""
    precompute: tuple[str, ...]
    """``tools/precompute_latents.py``."""
    diffusers: tuple[str, ...]
    """``benchmarks/diffusers_lora/run_timed.py``, which runs diffusers' LoRA script and times it from outside."""


class Section(Protocol):
    """One section of the report, as a module: ``run`` measures and returns its rows, ``render`` writes them as
    markdown lines. A module with ``SUMMARY = True`` reads the rows of others (``bench.rows(module)``) or the state
    of the machine after them, so it runs after every other section, wherever the report puts it. A module with
    ``STANDALONE = "<name>"`` also regenerates alone (``tools/bench.py --only <name>``, replacing itself inside an
    existing report); it must not read other sections' rows, and shows ``bench.command_alone(STANDALONE)``. A module's
    ``HEADING``, where it has one, is where a standalone section that comes before it goes in a report lacking it."""

    def run(self, bench: Bench) -> Any: ...

    def render(self, rows: Any) -> list[str]: ...


@dataclass
class Bench:
    """What every section runs with, and the rows of the sections that ran."""

    preset: Preset
    device: torch.device
    dtypes: dict[str, torch.dtype]
    """Label (``fp32``, ``bf16``) -> dtype of the DiT sections."""
    threads: int
    configs: Path
    """The folder of the model configs (``configs/``)."""
    workdir: Path
    """A scratch folder for clips, runs and caches, removed after the run."""
    commands: Commands
    compile_blocks: bool = False
    """Also time sat_video with every block ``torch.compile``'d."""
    trainers: ComparisonSetup | None = None
    """The fine-tuning comparison's setup; ``None``: not run."""
    diffusers_script: Path | None = None
    """diffusers' ``train_cogvideox_lora.py`` (else ``$SAT_VIDEO_DIFFUSERS_SCRIPT``)."""
    alone_commands: dict[str, str] = field(default_factory=dict)
    """``STANDALONE`` name -> the command that regenerates that section alone."""
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    load_before: tuple[float, float, float] | None = field(default_factory=load_average)
    results: dict[Section, Any] = field(default_factory=dict)

    def command_alone(self, name: str) -> str:
        """The command that regenerates the section ``STANDALONE = name`` alone."""
        return self.alone_commands.get(name, f"python tools/bench.py --only {name}")

    def rows(self, section: Section) -> Any:
        """The rows ``section`` returned; it must have run before the section asking."""
        if section not in self.results:
            name = getattr(section, "__name__", repr(section))
            ran = ", ".join(getattr(s, "__name__", repr(s)) for s in self.results) or "none"
            raise LookupError(f"{name} has not run (sections run so far: {ran}); list it before the sections that read it")
        return self.results[section]


def standalone(section: Section) -> str | None:
    """The name ``tools/bench.py --only`` knows ``section`` by, if it regenerates alone."""
    return getattr(section, "STANDALONE", None)


def measure(sections: Sequence[Section], bench: Bench) -> None:
    """Run ``sections`` in their order, the summaries (``SUMMARY = True``) last, into ``bench.results``."""
    for section in sorted(sections, key=lambda s: getattr(s, "SUMMARY", False)):  # a stable sort keeps the order
        bench.results[section] = section.run(bench)
