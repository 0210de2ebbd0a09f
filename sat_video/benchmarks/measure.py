"""Measurement primitives of the benchmark sections: interleaved timing, peak memory, FLOP counts.

Everything here works on CPU and CUDA. Peak memory on CUDA is the caching allocator's ``max_memory_allocated``;
on CPU, where no allocator keeps statistics, :class:`~sat_video.common.live_tensors.LiveTensorBytes` sums the bytes of
the tensor storages that operators return while it is active and that are still alive (forward and backward). Scratch
buffers that kernels allocate and free internally are invisible to it, for every implementation alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sat_video.common.live_tensors import LiveTensorBytes

MIB = 2**20


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FLOP counter knows the CUDA attention kernels only; CPU SDPA runs these two.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast for ``dtype=torch.bfloat16``, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype)


def interleaved_times(
    steps: dict[str, Callable[[], None]], *, device: torch.device, warmup: int, reps: int
) -> dict[str, list[float]]:
    """Wall seconds of each step, run in turn (ABBA order, so a drift in machine load hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(warmup + reps):
        for name in names if round_ % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``step`` above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak


def saved_bytes(forward: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Bytes a forward pass leaves allocated for its backward (its output included); released unused afterwards."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        out = forward()
        synchronize(device)
        saved = torch.cuda.memory_allocated(device) - before
    else:
        with LiveTensorBytes() as tracker:
            out = forward()
        saved = tracker.current
    del out  # only now: the measurement needs it alive
    return saved


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions and attention, forward and backward)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    return counter.get_total_flops()


def gradient_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
