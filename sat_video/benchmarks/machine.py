"""Section *Machine*: what the figures were measured on, with the load average before and after the run."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks.markdown import table

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

SUMMARY = True
"""Runs after the other sections, for the load average at the end."""


def load_average() -> tuple[float, float, float] | None:
    """1, 5 and 15 minute load averages, where the system keeps them."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """Model name, family / model numbers (virtual machines often hide the name) and the vector extensions that
    decide GEMM speed, from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in fields.get("flags", "").split()]
    family, model = fields.get("cpu family", "?"), fields.get("model", "?")
    return f"{fields['model name']} (family {family}, model {model}; {' '.join(flags) or 'no AVX2'})"


def _loads(values: tuple[float, ...]) -> str:
    return " / ".join(f"{x:.2f}" for x in values)


def run(bench: Bench) -> dict[str, str]:
    import diffusers

    device = bench.device
    info = {
        "date": bench.started.strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "torch threads": str(torch.get_num_threads()),
        "torch / diffusers / python": f"{torch.__version__} / {diffusers.__version__} / {platform.python_version()}",
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32 matmul"] = str(torch.backends.cuda.matmul.allow_tf32)
    if bench.load_before is not None:
        info["load average before the run (1/5/15 min)"] = _loads(bench.load_before)
    end = load_average()
    if end is not None:
        info["load average at end (1/5/15 min; this run's own threads included)"] = _loads(end)
    return info


def render(info: dict[str, str]) -> list[str]:
    return ["## Machine", "", table(["", ""], list(info.items()))]
