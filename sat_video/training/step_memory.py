"""The peak memory of each training step, for ``metrics.jsonl``'s ``peak_memory_gb``.

On CUDA it is ``torch.cuda.max_memory_allocated`` over the step (the statistics reset before it). On a CPU no allocator
keeps statistics, so it is counted as the sampler counts it (:mod:`sat_video.diffusion.memory`): the bytes of the tensors
the run keeps on its device when the step starts (DiT weights and gradients, every tensor the optimizer holds, the frozen
stages) plus the most bytes of tensors created during the step that were alive at once
(:class:`~sat_video.common.live_tensors.LiveTensorBytes`). That counter costs time on every operator, so on a CPU it runs
only when ``train.measure_memory`` asks for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from sat_video.common.live_tensors import LiveTensorBytes

GIB = 2**30
_WALK_DEPTH = 6


def held_tensor_bytes(roots: list[object], device: torch.device) -> int:
    """Bytes of the distinct storages on ``device`` reachable from ``roots``: modules' parameters, buffers and gradients,
    optimizers' states, and the tensors DeepSpeed's optimizer wrappers hold in their attributes, lists and dicts."""
    storages: dict[int, int] = {}
    seen: set[int] = set()

    def add(tensor: torch.Tensor) -> None:
        if tensor.device == device and tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())

    def walk(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > _WALK_DEPTH:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj)
            if obj.grad is not None:
                add(obj.grad)
        elif isinstance(obj, nn.Module):
            for tensor in (*obj.parameters(), *obj.buffers()):
                walk(tensor, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for item in obj:
                walk(item, depth + 1)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(key, depth + 1)
                walk(value, depth + 1)
        elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed."):
            for value in vars(obj).values():
                walk(value, depth + 1)

    for root in roots:
        walk(root, 0)
    return sum(storages.values())


class StepMemory:
    """Each step's peak, bracketed by :meth:`measure`; :meth:`take` gives the largest since the last record.

    Args:
        device: where the run computes.
        held: the objects whose tensors stay on the device between steps (read at each step's start, on CPU).
        on_cpu: measure on a CPU too (``train.measure_memory``); on CUDA it is always measured.
    """

    def __init__(self, device: torch.device, held: Callable[[], list[object]], on_cpu: bool = False):
        self.device, self.held = device, held
        self.enabled = device.type == "cuda" or on_cpu
        self._peak: int | None = None

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            resident = held_tensor_bytes(self.held(), self.device)
            with LiveTensorBytes() as tracker:
                yield
            peak = resident + tracker.peak
        self._peak = max(self._peak or 0, peak)

    def take(self) -> dict[str, float]:
        """``{"peak_memory_gb": ...}`` over the steps since the last call (empty when not measured)."""
        peak, self._peak = self._peak, None
        return {} if peak is None else {"peak_memory_gb": peak / GIB}
