"""benchmarks/RESULTS.md: its sections in order, and the report assembled from their rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sat_video.benchmarks import (
    block_streaming,
    checkpointing,
    data_loading,
    dit_steps,
    fine_tuning,
    fp8_storage,
    gemm_peak,
    kernel_profile,
    machine,
    method,
    mixed_sizes,
    sampling_memory,
    sequence_parallel,
    shard_streaming,
    targets,
    training_memory,
    training_steps,
    vae_training,
    weight_average,
)
from sat_video.benchmarks.context import Section, standalone
from sat_video.benchmarks.markdown import begin_marker, marked, replace_section

SECTIONS: tuple[Section, ...] = (machine, targets, gemm_peak, dit_steps, kernel_profile, checkpointing, training_steps,
                                 mixed_sizes, data_loading, sequence_parallel, sampling_memory, fine_tuning, fp8_storage,
                                 block_streaming, training_memory, weight_average, shard_streaming, vae_training, method)
"""In the report's order, which is also the order they measure in (the summaries aside: see ``Section``)."""


def assemble(sections: Sequence[Section], results: Mapping[Section, Any], command: str) -> str:
    """The report: a header naming ``command`` (what regenerates it), then each section's rendering in order."""
    header = ["# Benchmarks: sat_video vs diffusers", "", "Written by `tools/bench.py`; do not edit by hand. Regenerate with:",
              "", f"    {command}"]
    return "\n\n".join(["\n".join(header), *(_rendered(section, results[section]) for section in sections)])


def update(report: str, results: Mapping[Section, Any], order: Sequence[Section] = SECTIONS) -> str:
    """``report`` with each standalone section of ``results`` replaced between its markers, the rest unchanged; a
    section it lacks goes in front of the nearest section after it in ``order`` that ``report`` has (found by its
    markers or its ``HEADING``), else at the end."""
    for section in results:
        name = standalone(section)
        if name is None:
            raise ValueError(f"{getattr(section, '__name__', section)} is not standalone: only the whole report holds it")
        later = order[order.index(section) + 1:]
        report = replace_section(report, name, "\n".join(section.render(results[section])),
                                 tuple(anchor for s in later if (anchor := _anchor(s))))
    return report


def _rendered(section: Section, rows: Any) -> str:
    text = "\n".join(section.render(rows))
    name = standalone(section)
    return text if name is None else marked(name, text)


def _anchor(section: Section) -> str | None:
    """The line that starts ``section`` in a report, where it can be known without its rows."""
    name = standalone(section)
    return begin_marker(name) if name else getattr(section, "HEADING", None)
