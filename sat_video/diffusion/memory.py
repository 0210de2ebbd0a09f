"""Peak memory per sampling stage (T5, the DiT's denoising steps, VAE encode / decode).

On a GPU a stage's peak is CUDA's ``max_memory_allocated`` over the stage: everything on the device, weights included.
On a CPU there is no allocator to ask, so the peak is counted the same way from the tensors themselves: the weights
the stage's device holds when it starts (:attr:`~sat_video.diffusion.offload.WeightPlacement.loaded_bytes`) plus the
most bytes of tensors created during the stage that were alive at once (every op's outputs, tracked until their
storage is freed). Scratch memory inside one kernel is not a tensor and is not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30


class LiveTensorPeak(TorchDispatchMode):
    """Inside this mode: the most bytes of storage on ``device_type``, created by ops run inside, alive at once."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._live = {key: entry for key, entry in self._live.items() if not entry[0].expired()}
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == self.device_type:
                storage = tensor.untyped_storage()
                if storage._cdata not in inputs:  # a view or in-place result of an input allocates nothing
                    self._live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live_bytes = sum(nbytes for _, nbytes in self._live.values())
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


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
            with LiveTensorPeak(self.device.type) as tracker:
                yield
            peak = resident + tracker.peak_bytes
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
