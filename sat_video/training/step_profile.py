"""Where a training step's time goes: seconds per phase, averaged over a log window and written to ``metrics.jsonl``.

Phases: ``data_wait`` (the step waiting for its next batch: decoding and encoding not hidden behind the previous step),
``encode`` (the frozen stages on the step's batch, wherever that ran; overlapped with the DiT when ``data.prefetch`` is
on), ``forward``, ``backward`` and ``optimizer``. On CUDA the device phases are timed with events on the current stream,
read at log time, so timing adds no synchronisation to the step.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class StepProfile:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            started = time.perf_counter()
            yield
            self._seconds[name] += time.perf_counter() - started

    def add(self, name: str, seconds: float) -> None:
        """Time measured on the host (waiting, or work done in another thread)."""
        self._seconds[name] += seconds

    def take(self, steps: int) -> dict[str, float]:
        """``{"<phase>_s": mean seconds per step}`` since the last call, and reset."""
        for name, start, end in self._events:
            end.synchronize()
            self._seconds[name] += start.elapsed_time(end) / 1000
        seconds = {f"{name}_s": total / max(steps, 1) for name, total in self._seconds.items()}
        self._seconds.clear()
        self._events.clear()
        return seconds
