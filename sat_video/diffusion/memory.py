"""Peak memory per sampling stage (T5, the DiT's denoising steps, VAE encode / decode).

On a GPU a stage's peak is CUDA's ``max_memory_allocated`` over the stage: everything on the device, weights included.
On a CPU there is no allocator to ask, so the peak is counted the same way from the tensors themselves: the weights
the stage's device holds when it starts (:attr:`~sat_video.diffusion.offload.WeightPlacement.loaded_bytes`) plus the
most bytes of tensors created during the stage that were alive at once (every op's outputs, tracked until their
storage is freed, :class:`~sat_video.common.live_tensors.LiveTensorBytes`). Scratch memory inside one kernel is not a
tensor and is not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sat_video.common.live_tensors import LiveTensorBytes

GIB = 2**30


@dataclass
class StagePeak:
    stage: str
    peak_bytes: int
    seconds: float
    runs: int = 1


class MemoryMonitor:
    """Measures each stage bracketed by :meth:`measure` (the maximum over repeated runs of a stage).

    Args:
        device (`torch.device`): where the stages compute.
        resident_bytes (`Callable[[], int]`): on CPU, bytes of weights already on the device when a stage starts.
    """

    def __init__(self, device: torch.device | str, resident_bytes: Callable[[], int] = lambda: 0):
        self.device = torch.device(device)
        self.resident_bytes = resident_bytes
        self.stages: dict[str, StagePeak] = {}

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            resident = self.resident_bytes()
            with LiveTensorBytes() as tracker:
                yield
            peak = resident + tracker.peak
        self._record(StagePeak(stage, peak, time.perf_counter() - start))

    def _record(self, measured: StagePeak) -> None:
        known = self.stages.get(measured.stage)
        if known is None:
            self.stages[measured.stage] = measured
        else:
            known.peak_bytes = max(known.peak_bytes, measured.peak_bytes)
            known.seconds += measured.seconds
            known.runs += 1

    @property
    def peak_bytes(self) -> int:
        return max((stage.peak_bytes for stage in self.stages.values()), default=0)

    def describe(self) -> str:
        """One line per stage: peak, time, runs; then what the peak means on this device."""
        what = "CUDA max_memory_allocated" if self.device.type == "cuda" else "weights on the device + live tensors"
        lines = [f"peak memory per stage ({what}):"]
        lines += [f"  {s.stage:<12} {s.peak_bytes / GIB:8.3f} GiB  {s.seconds:7.1f} s  ({s.runs} run{'s' * (s.runs > 1)})"
                  for s in self.stages.values()]
        return "\n".join(lines)
