"""Section 3: the 5B forward + backward at 49x480x720 (17,550 video tokens) with activation checkpointing, bf16
weights as DeepSpeed's bf16 mode holds them: sat_video against diffusers with the same weights, eager and with every
block ``torch.compile``'d (``train.compile``), in s/step, tokens/s and MFU.

MFU counts the model's FLOPs (3x one forward's matmuls and attention, recomputation not counted) against the GPU's
dense bf16 peak from its datasheet, and against the bf16 matmul rate measured here."""

from __future__ import annotations

import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sat_video.benchmarks.gemm_peak import gemm_peak
from sat_video.benchmarks.measure import count_flops, median, synchronize
from sat_video.gpu_check.check import Check
from sat_video.gpu_check.report import gib

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                  "RTX 4090": 165e12}
"""Dense bf16 tensor-core peaks (FLOP/s) by a substring of the device name."""


def _datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)


class _Models:
    """Both DiTs in bf16 with the same random weights, checkpointing on, and one batch of inputs."""

    def __init__(self, check: Check):
        from sat_video.benchmarks.dit_pair import diffusers_twin
        from sat_video.formats.diffusers_format import diffusers_rotary_embedding
        from sat_video.model.build import build_dit
        from sat_video.model.config import DiTConfig
        from sat_video.model.stages import SPATIAL_COMPRESSION

        device = self.device = check.torch_device
        cfg = check.config(check.sizes.step_variant)
        dit_config = DiTConfig.from_config(cfg)
        torch.manual_seed(0)
        with torch.device(device):
            self.ours = build_dit(cfg).to(torch.bfloat16).train()
        self.ours.to(device)  # a table made on the host (numpy) would stay there otherwise
        self.theirs = diffusers_twin(self.ours, dit_config).to(torch.bfloat16).train()
        self.ours.activation_checkpointing = True
        self.theirs.enable_gradient_checkpointing()
        frames, height, width = check.sizes.step_clip
        latent = (dit_config.latent_frames_of(frames), height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)
        generator = torch.Generator(device).manual_seed(0)
        self.x = torch.randn(1, latent[0], dit_config.in_channels, *latent[1:], device=device, generator=generator,
                             dtype=torch.bfloat16)
        self.context = torch.randn(1, dit_config.text_length, dit_config.text_hidden_size, device=device,
                                   generator=generator, dtype=torch.bfloat16)
        self.t = torch.tensor([500], device=device)
        rope = diffusers_rotary_embedding(dit_config, *latent)
        self.rope = tuple(r.to(device) for r in rope) if rope is not None else None
        self.video_tokens = dit_config.token_grid(frames, *latent[1:]).num_tokens
        self.tokens = dit_config.text_length + self.video_tokens

    def forward(self, which: str) -> torch.Tensor:
        if which == "sat_video":
            return self.ours(self.x, self.t, self.context)
        return self.theirs(self.x, self.context, self.t, image_rotary_emb=self.rope, return_dict=False)[0]

    def step(self, which: str) -> None:
        model = self.ours if which == "sat_video" else self.theirs
        model.zero_grad(set_to_none=True)
        self.forward(which).float().square().mean().backward()


def _time(models: _Models, which: str, check: Check, reps: int) -> tuple[list[float], int]:
    device = check.torch_device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps + 1):  # the first is warm-up (and compilation)
        synchronize(device)
        start = time.perf_counter()
        models.step(which)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return times, peak


def run(check: Check) -> None:
    device, report = check.torch_device, check.report
    measured_peak, _ = gemm_peak(torch.bfloat16, device, (256 if check.quick else 8192,), reps=10)
    datasheet = _datasheet_peak(device)
    models = _Models(check)
    with torch.no_grad():
        flops = 3 * count_flops(lambda: models.forward("sat_video"))
    frames, height, width = check.sizes.step_clip
    report.text("", f"`{check.sizes.step_variant}` at {frames}x{height}x{width}: {models.video_tokens:,} video + "
                f"{models.tokens - models.video_tokens} text tokens, batch 1, {flops / 1e12:.1f} TFLOP per step "
                f"(model FLOPs). bf16 matmul measured here: {measured_peak / 1e12:.0f} TFLOP/s; datasheet peak: "
                + (f"{datasheet / 1e12:.0f} TFLOP/s." if datasheet else "unknown for this device."))
    report.table(["implementation", "mode", "first step (s)", "s/step (median)", "tokens/s", "MFU (datasheet)",
                  "MFU (measured matmul)", "peak memory (GiB)"])
    reps = check.sizes.step_reps

    def row(which: str, mode: str) -> None:
        times, peak = _time(models, which, check, reps)
        seconds = median(times[1:])
        mfu = f"{flops / seconds / datasheet:.0%}" if datasheet else "n/a"
        report.row(which, mode, f"{times[0]:.2f}", f"{seconds:.3f}", f"{models.tokens / seconds:,.0f}", mfu,
                   f"{flops / seconds / measured_peak:.0%}", gib(peak) if peak else "n/a (CPU)")

    row("sat_video", "eager")
    row("diffusers", "eager")
    if device.type == "cuda":
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                         set_priority=True):
            row("sat_video", "eager, cuDNN attention first")
    if not check.sizes.compile:
        report.text("", "Compiled blocks: timed in the full check only (compilation alone outlasts the quick one).")
        return
    models.ours.compile_blocks()
    row("sat_video", "compiled blocks (train.compile)")
    for block in models.theirs.transformer_blocks:
        block.compile()
    row("diffusers", "compiled blocks")
