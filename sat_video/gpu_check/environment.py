"""Section 1: versions, the device, which SDPA kernel our attention shapes get in bf16 (and how fast each backend is),
and whether fp8 (e4m3) matmuls run."""

from __future__ import annotations

import functools
import subprocess

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from sat_video.benchmarks.measure import interleaved_times, median, synchronize
from sat_video.gpu_check.check import Check

BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
KERNEL_NAMES = (("_for_cpu", "CPU flash"), ("cudnn", "cuDNN"), ("flash", "flash"), ("fmha", "efficient"),
                ("efficient", "efficient"), ("math", "math"))
"""Substrings of kernel (or op) names, and the SDPA backend they belong to."""


def _versions(check: Check) -> list[tuple[str, str]]:
    import deepspeed
    import diffusers
    import transformers

    rows = [("torch", torch.__version__), ("CUDA (torch built with)", str(torch.version.cuda)),
            ("cuDNN", str(torch.backends.cudnn.version())), ("deepspeed", deepspeed.__version__),
            ("diffusers", diffusers.__version__), ("transformers", transformers.__version__)]
    if check.torch_device.type == "cuda":
        props = torch.cuda.get_device_properties(check.torch_device)
        rows += [("GPU", f"{props.name} x {torch.cuda.device_count()}, {props.total_memory / 2**30:.1f} GiB, "
                  f"compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs")]
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            rows.append(("driver", smi.splitlines()[0] if smi else "unknown"))
        except (OSError, subprocess.TimeoutExpired):
            rows.append(("driver", "nvidia-smi not available"))
    return rows


def _kernel(run, device: torch.device) -> str:
    """What an SDPA call ran, as a backend label and a name: the GPU kernel that took the most time (CUDA), or the
    aten op that ``scaled_dot_product_attention`` dispatched to (CPU)."""
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
        name = max(kernels, key=lambda e: e.self_device_time_total).key if kernels else ""
    else:
        name = next((e.key for e in events if e.key.startswith("aten::_scaled_dot_product")), "")
    label = next((label for part, label in KERNEL_NAMES if part in name.lower()), "unknown")
    return f"{label} (`{name[:70] or 'nothing seen'}`)"


def _seconds(run, device: torch.device, reps: int) -> float:
    return median(interleaved_times({"run": run}, device=device, warmup=1, reps=reps)["run"])


def _attention(check: Check) -> None:
    report, device = check.report, check.torch_device
    report.text("", "SDPA on our attention shapes (text + video tokens, bf16, forward): the kernel PyTorch picks by "
                "default, and each backend forced. TFLOP/s counts 4 N^2 d per head.")
    report.table(["tokens", "heads x head dim", "default kernel", *(b.name.lower() for b in BACKENDS[:3]), "fastest"])
    tokens = 226 + (64 if check.quick else 17550)
    for heads, head_dim in ((48, 64), (24, 128)):
        if check.quick:
            heads = 2
        q = torch.randn(1, heads, tokens, head_dim, device=device, dtype=torch.bfloat16)
        run = functools.partial(F.scaled_dot_product_attention, q, q, q)
        default = _kernel(run, device)
        cells, best = [], None
        for backend in BACKENDS[:3]:
            try:
                with sdpa_kernel([backend]):
                    seconds = _seconds(run, device, 3)
                flops = 4 * tokens * tokens * head_dim * heads
                cells.append(f"{seconds * 1e3:.2f} ms, {flops / seconds / 1e12:.0f} TFLOP/s")
                best = min(best or (seconds, backend.name), (seconds, backend.name))
            except RuntimeError as error:
                cells.append(f"not available ({str(error).splitlines()[0][:60]})")
        report.row(tokens, f"{heads} x {head_dim}", default, *cells, best[1].lower() if best else "none")


def _fp8(check: Check) -> None:
    device, report = check.torch_device, check.report
    n = 256 if check.quick else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bf16 = _seconds(lambda: a @ b, device, 3 if check.quick else 10)
    line = f"bf16 matmul {n}^3: {2 * n**3 / bf16 / 1e12:.1f} TFLOP/s"
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device)
        fp8 = _seconds(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device, 10)
        line += f"; fp8 (e4m3) `torch._scaled_mm`: available, {2 * n**3 / fp8 / 1e12:.1f} TFLOP/s"
    except (RuntimeError, AttributeError) as error:
        line += f"; fp8 (e4m3) `torch._scaled_mm`: not available ({str(error).splitlines()[0][:100]})"
    report.text("", line + ".")


def run(check: Check) -> None:
    report = check.report
    report.table(["what", "version"])
    for name, value in _versions(check):
        report.row(name, value)
    _attention(check)
    _fp8(check)
