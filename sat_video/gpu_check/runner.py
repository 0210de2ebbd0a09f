"""Runs the sections in order, each in a process of its own with a time limit.

Sections are forked from a forkserver that has imported torch and the library once (a fresh interpreter per section
would spend seconds importing) and that never touched CUDA, so each section gets a clean CUDA context and its memory
back when it ends. A section is a process-group leader: at its limit the whole group (its training launches too) is
killed, and the report keeps the rows it wrote.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass

from sat_video.gpu_check.check import Check


@dataclass(frozen=True)
class Section:
    number: int
    title: str
    module: str
    """Its ``run(check)`` writes the rows; ``skip_reason(check)`` (optional) says why it cannot run here."""
    limit_s: float
    quick_limit_s: float


SECTIONS = (
    Section(1, "Environment", "sat_video.gpu_check.environment", 25, 30),
    Section(2, "Parity in bf16 at full width", "sat_video.gpu_check.parity", 50, 30),
    Section(3, "Step speed", "sat_video.gpu_check.step_speed", 110, 40),
    Section(4, "Sampling memory", "sat_video.gpu_check.sampling_memory", 75, 40),
    Section(5, "Training memory", "sat_video.gpu_check.training_memory", 110, 90),
    Section(6, "A real training run", "sat_video.gpu_check.training_run", 110, 90),
    Section(7, "Sequence parallelism", "sat_video.gpu_check.sequence_parallel", 90, 60),
)
"""Cheapest and most informative first. On one GPU the full limits of sections 1-6 add up to the 8 minutes a short GPU
loan affords (section 7 needs two GPUs and adds its own); a section that finishes early leaves its time unused."""
PRELOAD = ["torch", "diffusers", "transformers", "sat_video.config.loader", "sat_video.diffusion.sampling",
           "sat_video.formats.diffusers_format", "sat_video.benchmarks.measure", "sat_video.gpu_check.check"]
"""Imported once by the forkserver (none of them touches CUDA at import)."""


@dataclass
class Outcome:
    section: Section
    status: str
    seconds: float


def _module(section: Section):
    return importlib.import_module(section.module)


def _run_section(section: Section, check: Check) -> None:
    os.setpgrp()  # the parent kills the section's whole group at its limit
    try:
        _module(section).run(check)
    except BaseException:
        check.report.text("", "```", traceback.format_exc().rstrip()[-4000:], "```")
        raise


def run_sections(check: Check, numbers: set[int]) -> list[Outcome]:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    report, outcomes = check.report, []
    for section in SECTIONS:
        report.text("", f"## {section.number}. {section.title}")
        limit = section.quick_limit_s if check.quick else section.limit_s
        reason = None if section.number in numbers else "not in --sections"
        if reason is None and hasattr(module := _module(section), "skip_reason"):
            reason = module.skip_reason(check)
        if reason is not None:
            report.text("", f"Skipped: {reason}.")
            outcomes.append(Outcome(section, f"skipped: {reason}", 0.0))
            continue
        print(f"gpu_check: section {section.number}, {section.title} (limit {limit:.0f} s)", flush=True)
        start = time.perf_counter()
        process = context.Process(target=_run_section, args=(section, check), name=f"gpu_check-{section.number}")
        process.start()
        process.join(limit)
        if process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.join()
            status = f"timed out at its {limit:.0f} s limit (the rows above are what finished)"
        else:
            with contextlib.suppress(ProcessLookupError):  # what the section launched dies with it
                os.killpg(process.pid, signal.SIGKILL)
            status = "done" if process.exitcode == 0 else f"failed (exit {process.exitcode}; traceback above)"
        seconds = time.perf_counter() - start
        report.text("", f"_{status}, {seconds:.0f} s of {limit:.0f} s._")
        print(f"gpu_check: section {section.number} {status} in {seconds:.0f} s", flush=True)
        outcomes.append(Outcome(section, status, seconds))
    return outcomes

