"""Section *VAE training*: what a step of ``tools/train_vae.py`` costs at CogVideoX's VAE architecture (random weights)
on small clips, ``vae.trainable`` decoder and all, with and without ``vae.gradient_checkpointing``: step time, peak
memory, and the peak predicted at full size by a fit linear in voxels. Regenerates alone: ``tools/bench.py --only vae``.

A step is the generator's half of the trainer's step (``VaeTrainer._micro_step`` before ``disc_start``):
:class:`~sat_video.vae_training.autoencoder.TrainableAutoencoder`'s forward with a posterior sample,
:class:`~sat_video.vae_training.losses.VaeLoss`'s generator loss (pixel L2, LPIPS of one random frame per clip with
:func:`~sat_video.vae_training.lpips.random_lpips`, KL when everything trains), its backward and the AdamW update,
in fp32 on one process without DeepSpeed.

The step's peak is measured in its two phases, forward + backward and AdamW's update; the activations alone in one more
forward + backward that drops each gradient as it is accumulated. The prediction: ``peak = max(fixed + intercept +
per_voxel x voxels, update)``, where ``fixed`` is counted from the parameters (the weights of the VAE and LPIPS, the
gradients and AdamW's two moments of the trained ones), ``intercept + per_voxel x voxels`` is the least-squares line
through the activations over the measured clips' voxels (batch x frames x height x width), and ``update`` the largest
peak of the update measured (it does not depend on the clip).

Why a line with an intercept: clips of more than 9 frames decode in several chunks of latent frames, and backward then
holds each weight's gradient from one chunk until the other chunks' arrive to be summed with it. That buffer (up to the
decoder's gradients, whatever the clip's size) shows in the activations of every clip of two or more chunks, as every
target is: the measured clips have two or more, and the intercept takes it up. The prediction is an upper bound: it
counts the gradients twice where the intercept is that buffer, and puts every gradient next to the activations' peak.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sat_video.benchmarks.markdown import regenerate_alone, table
from sat_video.benchmarks.measure import MIB, interleaved_times, median, step_peak_bytes

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

STANDALONE = "vae"
GIB, KIB = 2**30, 2**10
TRAINABLE = ("decoder", "all")
MODES = {"off": False, "on": True}
"""Gradient checkpointing (``vae.gradient_checkpointing``) off and on."""
RECIPE = ("vae/cogvideox_vae.yaml", "vae/decoder_17x256.yaml")
"""The decoder fine-tune (under ``configs/``) whose training crop the prediction is for."""
WHOLE_CLIP = (49, 480, 720)
"""CogVideoX's clips, trained whole (no ``vae.crop``)."""

TEMPORAL_COMPRESSION = 4
Size = tuple[int, int, int]


@dataclass(frozen=True)
class VaeTrainingScale:
    """The VAE the section trains, the clips (frames, height, width; batch 1) it measures and what of the VAE trains."""

    label: str
    """What the network is, for the report."""
    sizes: tuple[Size, ...]
    """Each measured for its peak and activations (what the fit is made of): at least two voxel counts."""
    timed: tuple[Size, ...]
    """The sizes also timed (each a member of ``sizes``): the median of ``reps`` steps per checkpointing mode."""
    reps: int
    architecture: Mapping[str, Any] = field(default_factory=dict)
    """``model.first_stage.architecture``: what differs from CogVideoX's VAE (``{}``: CogVideoX's VAE itself)."""
    trainable: tuple[str, ...] = TRAINABLE
    """The ``vae.trainable`` settings measured (the recipe's, ``decoder``, first)."""


def fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """The least-squares line through ``(voxels, bytes)`` points (two voxel counts at least): ``(intercept, bytes per
    voxel)``."""
    n = len(points)
    mean_v, mean_b = sum(v for v, _ in points) / n, sum(b for _, b in points) / n
    spread = sum((v - mean_v) ** 2 for v, _ in points)
    if spread == 0:
        raise ValueError(f"a line needs clips of two voxel counts at least; found {sorted({v for v, _ in points})}")
    slope = sum((v - mean_v) * (b - mean_b) for v, b in points) / spread
    return mean_b - slope * mean_v, slope


def activations_fitted(fit: Mapping[str, float], voxels: int) -> float:
    return fit["intercept"] + fit["per_voxel"] * voxels


def predicted_peak(fit: Mapping[str, float], voxels: int) -> float:
    """Bytes: ``fixed + intercept + per_voxel x voxels`` of ``fit``, or the update's peak ``fit["update"]`` where that
    is more."""
    return max(fit["fixed"] + activations_fitted(fit, voxels), fit.get("update", 0.0))


@contextlib.contextmanager
def gradients_dropped(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Each of ``params``' gradients freed as soon as backward has accumulated it: what a forward + backward then
    holds at its peak is its activations (and one gradient)."""

    def drop(param: torch.nn.Parameter) -> None:
        param.grad = None

    handles = [param.register_post_accumulate_grad_hook(drop) for param in params]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def decode_chunks(frames: int) -> int:
    """How many pieces diffusers' ``AutoencoderKLCogVideoX._decode`` decodes a clip of ``frames`` in (2 latent frames
    each, the first taking an odd one left over)."""
    latent_frames = (frames - 1) // TEMPORAL_COMPRESSION + 1
    return max(latent_frames // 2, 1)


def voxels(size: Size, batch: int = 1) -> int:
    frames, height, width = size
    return batch * frames * height * width


def run(bench: Bench) -> dict:
    """``rows``: per trainable, size and checkpointing mode, the peak (and the median step time at the timed sizes);
    ``fits``: per trainable and mode, the fixed bytes and bytes per voxel; ``targets``: the full sizes predicted."""
    from sat_video.config.loader import load_config
    from sat_video.vae_training.lpips import random_lpips

    scale: VaeTrainingScale = bench.preset.vae_training
    recipe_cfg = load_config([bench.configs / name for name in RECIPE])
    crop = recipe_cfg.vae.crop or [recipe_cfg.data.height, recipe_cfg.data.width]
    recipe = {"trainable": recipe_cfg.vae.trainable, "checkpointing": bool(recipe_cfg.vae.gradient_checkpointing),
              "size": (int(recipe_cfg.model.dit.num_frames), *map(int, crop)), "batch": recipe_cfg.train.micro_batch_size,
              "precision": recipe_cfg.deepspeed.precision, "configs": RECIPE}
    lpips = random_lpips().to(bench.device)  # frozen: the same for both
    rows, counts = [], {}
    for trainable in scale.trainable:
        measured, counts[trainable] = _measure(bench, scale, trainable, lpips)
        gc.collect()  # the VAE, its AdamW and clips go before the next is built
        rows += measured
    fits = []
    for trainable in scale.trainable:
        for mode in MODES:
            own = [r for r in rows if r["trainable"] == trainable and r["mode"] == mode]
            fixed = counts[trainable]["fixed"]
            intercept, per_voxel = fit_line([(voxels(r["size"]), r["activations"]) for r in own])
            update = max(r["update_peak"] for r in rows if r["trainable"] == trainable)
            fits.append({"trainable": trainable, "mode": mode, "fixed": fixed, "intercept": intercept,
                         "per_voxel": per_voxel, "update": update})
    targets = [{"size": recipe["size"], "batch": recipe["batch"]}, {"size": WHOLE_CLIP, "batch": 1}]
    return {"label": scale.label, "reps": scale.reps, "rows": rows, "counts": counts, "fits": fits, "recipe": recipe,
            "targets": targets, "device": str(bench.device), "command": bench.command_alone(STANDALONE)}


def _measure(bench: Bench, scale: VaeTrainingScale, trainable: str, lpips: torch.nn.Module) -> tuple[list[dict], dict]:
    from sat_video.model.config import FirstStageConfig
    from sat_video.training.config import OptimizerConfig
    from sat_video.training.optim import FiniteAdamW, parameter_groups
    from sat_video.training.step_memory import held_tensor_bytes
    from sat_video.vae_training.autoencoder import TrainableAutoencoder, load_autoencoder
    from sat_video.vae_training.config import VaeLossConfig
    from sat_video.vae_training.losses import VaeLoss

    device = bench.device
    vae, _ = load_autoencoder(FirstStageConfig(architecture=dict(scale.architecture), init_seed=0))
    model = TrainableAutoencoder(vae.to(device), trainable).train()
    loss = VaeLoss(VaeLossConfig(), trainable, lpips)  # pixel L2, LPIPS of 1 frame, KL 1e-6 (all), no GAN
    optimizer = FiniteAdamW(parameter_groups(model, 0.0), OptimizerConfig(lr=1e-5, betas=[0.9, 0.999], weight_decay=0.0))
    generator = torch.Generator().manual_seed(0)
    clips = {size: (torch.rand(1, 3, *size, generator=generator) * 2 - 1).to(device) for size in scale.sizes}

    def forward_backward(size: Size, checkpointing: bool):
        def run():
            if checkpointing:  # what TrainableAutoencoder(..., gradient_checkpointing=True) does
                model.vae.enable_gradient_checkpointing()
            else:
                model.vae.disable_gradient_checkpointing()
            video = clips[size]
            out = model(video, generator)
            loss.generator(out, video, generator, model.last_layer, None).total.backward()

        return run

    def update():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # after the step, as DeepSpeed's engine: no gradient is held between steps

    def step(size: Size, checkpointing: bool):
        first = forward_backward(size, checkpointing)

        def run():
            first()
            update()

        return run

    weights = sum(t.numel() * t.element_size() for module in (model, lpips) for t in module.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    trained_bytes = sum(p.numel() * p.element_size() for p in trained)
    counts = {"parameters": sum(p.numel() for p in model.parameters()), "trained": sum(p.numel() for p in trained),
              "lpips": sum(p.numel() for p in lpips.parameters()), "weights": weights, "trained_bytes": trained_bytes,
              # weights, then the trained ones' gradients and AdamW's exp_avg and exp_avg_sq
              "fixed": weights + 3 * trained_bytes}
    # AdamW creates its moments in an update with zero gradients (no weight moves: no decay, a zero step), so that
    # they are held when the measured steps start, as in every step of a run but the first
    for param in trained:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    rows, update_peak = [], None
    for size in scale.sizes:
        for mode, checkpointing in MODES.items():
            clip = clips[size].numel() * clips[size].element_size()
            with gradients_dropped(trained):
                activations = clip + step_peak_bytes(forward_backward(size, checkpointing), device)
            held = held_tensor_bytes([model, lpips, optimizer, clips[size]], device)
            backward_peak = held + step_peak_bytes(forward_backward(size, checkpointing), device)
            if update_peak is None:  # the same at every clip size and mode: measured once (the counter is slow)
                update_peak = held_tensor_bytes([model, lpips, optimizer, clips[size]], device) + step_peak_bytes(update, device)
            else:
                update()
            rows.append({"trainable": trainable, "size": size, "mode": mode, "held": held, "activations": activations,
                         "backward_peak": backward_peak, "update_peak": update_peak,
                         "peak": max(backward_peak, update_peak), "time": None})
            print(f"vae {trainable} {'x'.join(map(str, size))} checkpointing {mode}: activations {activations / MIB:.0f} "
                  f"MiB; peak {backward_peak / MIB:.0f} MiB in forward/backward, {update_peak / MIB:.0f} MiB in the update "
                  f"(held at the start {held / MIB:.0f}, counted fixed {counts['fixed'] / MIB:.0f})", flush=True)
    for size in scale.timed:
        # the measured step above, at this size and mode, was its warm-up
        times = interleaved_times({mode: step(size, on) for mode, on in MODES.items()}, device=device, warmup=0,
                                  reps=scale.reps)
        for row in rows:
            if row["size"] == size:
                row["time"] = median(times[row["mode"]])
        print(f"vae {trainable} {'x'.join(map(str, size))}: "
              + ", ".join(f"checkpointing {mode} {median(t):.2f}s" for mode, t in times.items()), flush=True)
    return rows, counts


def _size(size: Size) -> str:
    return "x".join(map(str, size))


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def _recipe_note(result: dict, fits: Mapping[tuple[str, str], Mapping[str, float]]) -> list[str]:
    """The recipe's predicted peak in fp32 and under bf16 autocast, and what the targets are not; where the recipe's
    ``vae.trainable`` was measured."""
    recipe = result["recipe"]
    fit = fits.get((recipe["trainable"], "on" if recipe["checkpointing"] else "off"))
    lines = []
    if fit is not None:
        recipe_voxels = voxels(recipe["size"], recipe["batch"])
        lines.append(
            f"The recipe's step is predicted at {predicted_peak(fit, recipe_voxels) / GIB:.1f} GiB in fp32 on one process; "
            f"under its `deepspeed.precision: {recipe['precision']}` (autocast: weights and AdamW stay fp32, convolutions "
            "give bf16, group norms run in fp32) the activation part shrinks by at most half, to no less than "
            f"{(fit['fixed'] + activations_fitted(fit, recipe_voxels) / 2) / GIB:.1f} GiB. ")
    return ["".join(lines) + f"{_size(WHOLE_CLIP)} is a whole CogVideoX clip *trained* (no `vae.crop`); evaluating one "
            "(no gradients, nothing kept for backward) is a different, smaller peak. ZeRO-2 on N ranks would split the "
            "moments and the reduced gradients N ways.", ""]


def render(result: dict) -> list[str]:
    rows, counts, recipe = result["rows"], result["counts"], result["recipe"]
    fits = {(f["trainable"], f["mode"]): f for f in result["fits"]}
    off = {(r["trainable"], r["size"]): r for r in rows if r["mode"] == "off"}
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    measured_rows = []
    for r in rows:
        base = off[r["trainable"], r["size"]]
        activations, base_activations = r["activations"], base["activations"]
        measured_rows.append([
            _size(r["size"]), r["trainable"], f"{counts[r['trainable']]['trained'] / 1e6:.1f} M", r["mode"],
            "-" if r["time"] is None else f"{r['time']:.2f}",
            "-" if r["time"] is None else f"{r['time'] / base['time'] - 1:+.0%}",
            f"{r['peak'] / MIB:,.0f}", "forward/backward" if r["backward_peak"] >= r["update_peak"] else "AdamW update",
            f"{activations / MIB:,.0f}",
            f"{base_activations / activations:.1f}x" if activations > 0 else "-",
        ])
    prediction_rows = []
    for (trainable, mode), fit in fits.items():
        residuals, ratios = [], []
        for size in sizes:
            row = next(r for r in rows if (r["trainable"], r["mode"], r["size"]) == (trainable, mode, size))
            residuals.append(f"{activations_fitted(fit, voxels(size)) / row['activations'] - 1:+.1%}")
            ratios.append(f"{predicted_peak(fit, voxels(size)) / row['peak']:.2f}")
        is_recipe = (trainable, MODES[mode]) == (recipe["trainable"], recipe["checkpointing"])
        prediction_rows.append([
            trainable + (" (recipe)" if is_recipe else ""), mode, _gib(fit["fixed"]), f"{fit['intercept'] / GIB:.2f}",
            f"{fit['per_voxel'] / KIB:.1f}",
            ", ".join(residuals), ", ".join(ratios),
            *(_gib(predicted_peak(fit, voxels(t["size"], t["batch"]))) for t in result["targets"]),
        ])
    trainables = list(counts)
    target_names = [f"{_size(t['size'])}" + (f" x {t['batch']}" if t["batch"] > 1 else "") for t in result["targets"]]
    first = counts[trainables[0]]
    timed = [_size(size) for size in sizes if any(r["time"] is not None for r in rows if r["size"] == size)]
    target_voxels = [voxels(t["size"], t["batch"]) for t in result["targets"]]
    low, high = min(target_voxels) / max(map(voxels, sizes)), max(target_voxels) / min(map(voxels, sizes))
    chunked = (", as has every clip measured here" if all(decode_chunks(size[0]) > 1 for size in sizes)
               else ", unlike the clips measured here: their line misses the buffer")
    return [
        "## VAE training: step time and peak memory (tools/train_vae.py)",
        "",
        regenerate_alone(result["command"]),
        "",
        f"{result['label']}, random weights ({first['parameters'] / 1e6:.1f} M parameters; "
        + "; ".join(f"`vae.trainable: {t}` trains {counts[t]['trained'] / 1e6:.1f} M" for t in trainables)
        + "), on one clip of random pixels, "
        f"fp32, one process ({result['device']}), no DeepSpeed. A step is the VAE's half of `tools/train_vae.py`'s step "
        "before `vae.loss.disc_start`: `TrainableAutoencoder`'s forward (the encoder without gradients for `decoder`) "
        "with a posterior sample, `VaeLoss`'s generator loss (pixel L2, LPIPS of one random frame per clip with "
        f"`random_lpips`, {first['lpips'] / 1e6:.1f} M frozen parameters; the KL term for `all`), its backward, and "
        "AdamW's update (`FiniteAdamW`); the discriminator's step (from `disc_start` on) is not in it. *checkpointing*: "
        "`vae.gradient_checkpointing` (diffusers' `enable_gradient_checkpointing()`, recomputing each block in "
        "backward). Step time: "
        + (f"the median of {result['reps']} steps" if result["reps"] > 1 else "one step")
        + " per mode, off and on interleaved, after the step whose peak is measured (AdamW's moments exist from the "
        "start: an update with zero gradients made them)"
        + ("" if len(timed) == len(sizes) else f"; timed at {', '.join(timed)} only (the other sizes: the peak only, to "
           "keep the section's run time down)")
        + ". bf16 autocast, which the recipe trains with, is not timed: a CPU without bf16 instructions emulates bf16 "
        "convolutions, orders of magnitude slower than fp32.",
        "",
        "*Peak*, as `train.measure_memory` counts a CPU step: the tensors held when a phase starts "
        "(`held_tensor_bytes`: weights of the VAE and LPIPS, AdamW's moments, the clip, and for the update the "
        "gradients) plus the most bytes of tensors the phase creates that are alive at once (`LiveTensorBytes`); on "
        "CUDA the allocator's peak. The step's peak is the larger of its two phases' (*peak in*): forward + backward "
        "(activations and gradients) and AdamW's update (its temporaries). *Activations*: the clip plus the peak of "
        "one more forward + backward, before the step, that frees each gradient as soon as it is accumulated "
        "(`register_post_accumulate_grad_hook`): what the pass itself holds, which the gradients can hide in the "
        "step's peak (on small clips it comes at the end of backward, every gradient made and the activations gone). "
        "Kernels' scratch memory is invisible on a CPU.",
        "",
        table(["frames x H x W", "trainable", "trained", "checkpointing", "step (s)", "extra time", "peak (MiB)", "peak in",
               "activations (MiB)", "reduction"], measured_rows),
        "",
        "### Predicted peak at full size (fp32, GiB; not measured on a GPU)",
        "",
        "*peak = fixed + intercept + per voxel x voxels* (voxels = batch x frames x height x width of the clip), or the "
        "update's peak where that is more: *fixed* counted from the parameters (fp32 weights of the VAE and LPIPS, plus "
        "gradients and AdamW's two moments of the trained weights); *intercept* and *per voxel* the least-squares line "
        "through the *activations* above over the clips' voxels; the update's peak the largest measured. The intercept "
        "is mostly gradients: a clip of more than 9 frames decodes in chunks of latent frames (diffusers decodes 2 at a "
        "time, the first 3), and backward holds each decoder weight's gradient from one chunk until the others' arrive "
        "to be summed, a buffer of up to the decoder's gradients whatever the clip's size (9-frame clips, one chunk, "
        f"have none; every target has two chunks or more{chunked}). So the prediction is an upper bound: it counts "
        "that buffer on top of *fixed*'s gradients, and puts every gradient next to the activations' peak, which comes "
        "before most exist. *Fit residual*: the line over the measured activations - 1; *predicted / "
        f"measured*: the predicted peak over the step's measured peak; each at {', '.join(map(_size, sizes))}. The excess "
        "there is about the trained weights' gradients ("
        + ", ".join(f"{counts[t]['trained_bytes'] / GIB:.2f} GiB {t}" for t in trainables)
        + "), which *fixed* counts in full though backward has made few of them at that peak; at full size it is at most the "
        "same bytes, a smaller share. "
        f"*(recipe)*: `configs/{recipe['configs'][-1]}` (trainable {recipe['trainable']}, checkpointing "
        f"{'on' if recipe['checkpointing'] else 'off'}, {_size(recipe['size'])} crops, batch {recipe['batch']}).",
        "",
        table(["trainable", "checkpointing", "fixed (GiB)", "intercept (GiB)", "per voxel (KiB)", "fit residual",
               "predicted / measured",
               *(f"{name} (GiB)" for name in target_names)], prediction_rows),
        "",
        *_recipe_note(result, fits),
        f"These are linear extrapolations from small clips on a CPU (the targets have {low:,.0f} to {high:,.0f} times "
        "their voxels), not measurements: the CUDA caching allocator's rounding and fragmentation, cuDNN's workspaces "
        "and the kernels' own scratch memory are not in them, and the small clips' border padding at the lowest "
        "resolutions makes *per voxel* err on the high side.",
    ]
