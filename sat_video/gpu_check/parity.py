"""Section 2: every variant at its real width and depth, random weights, one forward in bf16 against diffusers'
``CogVideoXTransformer3DModel`` holding the same weights, at a reduced token count (a few latent frames).

Both bf16 outputs are compared with an fp32 forward of diffusers (TF32 off): sat_video passes when its error is within
twice diffusers' own bf16 error (or within 1% of the output's scale), since then both err the way bf16 does."""

from __future__ import annotations

import time

import torch

from sat_video.benchmarks.measure import synchronize
from sat_video.gpu_check.check import Check
from sat_video.gpu_check.report import verdict

BF16_FLOOR = 1e-2


def _relative(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return (a.float() - b.float()).abs().max().item() / scale


def _variant(check: Check, variant: str) -> None:
    from sat_video.benchmarks.dit_pair import diffusers_twin
    from sat_video.formats.diffusers_format import diffusers_rotary_embedding
    from sat_video.model.build import build_dit
    from sat_video.model.config import DiTConfig

    started = time.perf_counter()
    device = check.torch_device
    cfg = check.config(variant)
    dit_config = DiTConfig.from_config(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        ours = build_dit(cfg).eval()
    ours.to(device)  # a table made on the host (numpy) would stay there otherwise
    with torch.no_grad():
        for param in ours.parameters():  # zero-initialised parts (gates, modulations) must matter
            param.add_(torch.randn_like(param) * 0.02)
    theirs = diffusers_twin(ours, dit_config).eval()
    params = sum(p.numel() for p in ours.parameters())
    generator = torch.Generator(device).manual_seed(0)
    frames, height, width = check.sizes.parity_latent_frames, dit_config.latent_height, dit_config.latent_width
    x = torch.randn(1, frames, dit_config.in_channels, height, width, device=device, generator=generator)
    context = torch.randn(1, dit_config.text_length, dit_config.text_hidden_size, device=device, generator=generator)
    t = torch.tensor([500], device=device)
    rope = diffusers_rotary_embedding(dit_config, frames, height, width)
    rope = tuple(r.to(device) for r in rope) if rope is not None else None
    video_tokens = frames // (dit_config.patch_size_t or 1) * (height // dit_config.patch_size) * (width // dit_config.patch_size)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        reference = theirs(x, context, t, image_rotary_emb=rope, return_dict=False)[0]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ours.to(torch.bfloat16)
        theirs.to(torch.bfloat16)
        mine = ours(x.bfloat16(), t, context.bfloat16())
        diffusers = theirs(x.bfloat16(), context.bfloat16(), t, image_rotary_emb=rope, return_dict=False)[0]
    synchronize(device)
    scale = reference.abs().max().item()
    ours_error, theirs_error = _relative(mine, reference, scale), _relative(diffusers, reference, scale)
    between = _relative(mine, diffusers, scale)
    ok = ours_error <= max(2 * theirs_error, BF16_FLOOR) and torch.isfinite(mine).all().item()
    check.report.row(variant, f"{params / 1e9:.2f} B", dit_config.num_layers, video_tokens, f"{ours_error:.1e}",
                     f"{theirs_error:.1e}", f"{between:.1e}", verdict(ok), f"{time.perf_counter() - started:.0f}")


def run(check: Check) -> None:
    check.report.text("", "Errors are max |output - fp32 diffusers| / max |fp32 diffusers output|.")
    check.report.table(["variant", "parameters", "blocks", "video tokens", "sat_video bf16 error",
                        "diffusers bf16 error", "sat_video vs diffusers", "verdict", "seconds"])
    for variant in check.sizes.parity_variants:
        _variant(check, variant)
        if check.torch_device.type == "cuda":
            torch.cuda.empty_cache()
