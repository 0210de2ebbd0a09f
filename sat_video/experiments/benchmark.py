"""Measurement primitives for ``tools/bench.py``: interleaved timing, peak memory, FLOP counts, GEMM peak, machine,
and :class:`DiTPair`, a sat_video DiT and diffusers' ``CogVideoXTransformer3DModel`` with the same weights.

Everything here works on CPU and CUDA. Peak memory on CUDA is the caching allocator's ``max_memory_allocated``;
on CPU, where no allocator keeps statistics, :class:`LiveTensorBytes` sums the bytes of the tensor storages that
operators return while it is active and that are still alive (forward and backward). Scratch buffers that kernels
allocate and free internally are invisible to it, for every implementation alike.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sat_video.common.live_tensors import LiveTensorBytes


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


def gemm_peak(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...], reps: int) -> tuple[float, int]:
    """Best median FLOP/s of square ``n x n @ n x n`` products over ``sizes``, and the size that gave it."""
    best = (0.0, sizes[0])
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        times = interleaved_times({"mm": lambda a=a, b=b: torch.mm(a, b)}, device=device, warmup=1, reps=reps)["mm"]
        best = max(best, (2 * n**3 / median(times), n))
    return best


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


def machine(device: torch.device) -> dict[str, str]:
    """What the figures were measured on."""
    import diffusers

    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "torch threads": str(torch.get_num_threads()),
        "torch / diffusers / python": f"{torch.__version__} / {diffusers.__version__} / {platform.python_version()}",
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32 matmul"] = str(torch.backends.cuda.matmul.allow_tf32)
    if hasattr(os, "getloadavg"):
        info["load average before the run (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


class DiTPair:
    """sat_video's DiT (random weights everywhere, zero-initialised parts included), diffusers' model with the
    same weights, and inputs at the model's own latent size (so diffusers uses its stored position table). Building it
    runs one fp32 step of each and refuses models whose gradients differ.

    Args:
        cfg: a loaded config (``model.dit`` is used); diffusers must be able to express it.
        batch: samples per step.
        device: where both models and the inputs live.
    """

    def __init__(self, cfg, batch: int, device: torch.device):
        from diffusers import CogVideoXTransformer3DModel

        from sat_video.formats.diffusers_format import diffusers_rotary_embedding, to_diffusers_config, to_diffusers_state_dict
        from sat_video.model.build import build_dit
        from sat_video.model.config import DiTConfig

        dit_config = DiTConfig.from_config(cfg)
        torch.manual_seed(0)
        self.ours = build_dit(cfg)
        with torch.no_grad():
            for param in self.ours.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        self.theirs = CogVideoXTransformer3DModel(**to_diffusers_config(dit_config))
        self.theirs.load_state_dict(to_diffusers_state_dict(self.ours.state_dict(), dit_config), strict=True)
        self.ours.to(device).train()
        self.theirs.to(device).train()
        self.device = device

        self.x = torch.randn(
            batch,
            dit_config.latent_frames,
            dit_config.in_channels,
            dit_config.latent_height,
            dit_config.latent_width,
            device=device,
        )
        self.context = torch.randn(batch, dit_config.text_length, dit_config.text_hidden_size, device=device)
        self.timesteps = torch.randint(0, 1000, (batch,), device=device)
        rope = diffusers_rotary_embedding(dit_config, dit_config.latent_frames, dit_config.latent_height, dit_config.latent_width)
        self.rope = tuple(r.to(device) for r in rope) if rope is not None else None
        self.tokens = (
            dit_config.text_length
            + dit_config.latent_frames * dit_config.latent_height * dit_config.latent_width // dit_config.patch_size**2
        )
        self.params = sum(p.numel() for p in self.ours.parameters())

        for fn in self.steps(torch.float32).values():
            fn()
        check_same_gradients(self.ours, self.theirs, dit_config)

    def forward(self, model: torch.nn.Module, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        def run():
            with autocast(self.device, dtype):
                if model is self.theirs:
                    return model(self.x, self.context, self.timesteps, image_rotary_emb=self.rope, return_dict=False)[0]
                return model(self.x, self.timesteps, self.context)

        return run

    def step(self, model: torch.nn.Module, dtype: torch.dtype) -> Callable[[], None]:
        """One training step's forward and backward (no optimizer): loss = mean squared output, in fp32."""
        forward = self.forward(model, dtype)

        def run():
            model.zero_grad(set_to_none=True)
            forward().float().square().mean().backward()

        return run

    def steps(self, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
        return {"sat_video": self.step(self.ours, dtype), "diffusers": self.step(self.theirs, dtype)}


def check_same_gradients(ours, theirs, dit_config) -> None:
    """Refuse to time two models that do not compute the same gradients (fp32): the comparison would be void."""
    from sat_video.formats.diffusers_format import to_diffusers_state_dict

    expected = to_diffusers_state_dict({name: p.grad for name, p in ours.named_parameters()}, dit_config)
    # Some gradients are zero up to rounding (the key bias without RoPE: softmax ignores a shift shared by all keys),
    # so errors are relative to each tensor's largest gradient, or to 1e-3 of the largest one overall if larger.
    floor = 1e-3 * max(g.abs().max() for g in expected.values())
    for name, param in theirs.named_parameters():
        if name.startswith("norm_final."):  # its weights carry the final-layer eps fold, so its gradient is rescaled
            continue
        error = (param.grad - expected[name]).abs().max() / expected[name].abs().max().clamp_min(floor)
        if error > 1e-4:
            raise AssertionError(f"{name}: the gradients of sat_video and diffusers differ (relative {error:.1e})")


def gradient_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
