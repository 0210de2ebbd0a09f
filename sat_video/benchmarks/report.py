"""benchmarks/RESULTS.md: its sections in order, and the report assembled from their rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sat_video.benchmarks import (
    checkpointing,
    data_loading,
    dit_steps,
    fine_tuning,
    gemm_peak,
    kernel_profile,
    machine,
    method,
    mixed_sizes,
    sampling_memory,
    sequence_parallel,
    targets,
    training_steps,
)
from sat_video.benchmarks.context import Section

SECTIONS: tuple[Section, ...] = (machine, targets, gemm_peak, dit_steps, kernel_profile, checkpointing, training_steps,
                                 mixed_sizes, data_loading, sequence_parallel, sampling_memory, fine_tuning, method)
"""In the report's order, which is also the order they measure in (the summaries aside: see ``Section``)."""


def assemble(sections: Sequence[Section], results: Mapping[Section, Any], command: str) -> str:
    """The report: a header naming ``command`` (what regenerates it), then each section's rendering in order."""
    header = ["# Benchmarks: sat_video vs diffusers", "", "Written by `tools/bench.py`; do not edit by hand. Regenerate with:",
              "", f"    {command}"]
    return "\n\n".join("\n".join(lines) for lines in (header, *(section.render(results[section]) for section in sections)))
