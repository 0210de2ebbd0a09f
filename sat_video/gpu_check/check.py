"""What every section runs with: the device, the sizes (full on a GPU, tiny with ``--quick``), and where it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sat_video.gpu_check.report import Report


@dataclass(frozen=True)
class Sizes:
    """The sizes of one mode. ``model_configs``: config files stacked after each model's own (``tiny.yaml`` narrows the
    widths for ``--quick``); a clip is ``(frames, height, width)`` in pixels."""

    model_configs: tuple[str, ...]
    train_configs: tuple[str, ...]
    parity_variants: tuple[str, ...]
    parity_latent_frames: int
    step_variant: str
    step_clip: tuple[int, int, int]
    step_reps: int
    compile: bool
    """Time compiled blocks too (compilation takes tens of seconds even at tiny sizes)."""
    sampling_variant: str
    sampling_clip: tuple[int, int, int]
    train_variant: str
    train_clip: tuple[int, int, int]
    run_variant: str
    run_steps: int
    clips: int
    """Generated clips for the training sections."""
    tiny_t5: dict = field(default_factory=dict)
    """Sizes of the random T5 the training runs encode captions with (its output width is the DiT's ``text_hidden_size``)."""


FULL = Sizes(
    model_configs=(), train_configs=(), parity_variants=("cogvideox_2b", "cogvideox_5b", "cogvideox1.5_5b"),
    parity_latent_frames=4, step_variant="cogvideox_5b", step_clip=(49, 480, 720), step_reps=3, compile=True,
    sampling_variant="cogvideox_5b", sampling_clip=(49, 480, 720), train_variant="cogvideox_5b", train_clip=(49, 480, 720),
    run_variant="cogvideox_2b", run_steps=20, clips=4, tiny_t5=dict(d_model=4096, num_layers=1, num_heads=8, d_ff=1024))
QUICK = Sizes(
    model_configs=("tiny.yaml",), train_configs=("tiny.yaml", "tiny_train.yaml"),
    parity_variants=("cogvideox_2b", "cogvideox_5b", "cogvideox1.5_5b"), parity_latent_frames=4,
    step_variant="cogvideox_5b", step_clip=(13, 64, 64), step_reps=2, compile=False, sampling_variant="cogvideox_5b",
    sampling_clip=(13, 64, 64), train_variant="cogvideox_5b", train_clip=(13, 64, 64), run_variant="cogvideox_2b",
    run_steps=6, clips=4, tiny_t5=dict(d_model=32, num_layers=1, num_heads=2, d_ff=64))


@dataclass(frozen=True)
class Check:
    device: str
    quick: bool
    report_path: Path
    workdir: Path
    """Scratch space shared by the sections (generated clips, run folders); removed at the end."""
    configs: Path
    train_script: Path
    """``tools/train_video.py``, handed down by the tool (the library does not reach for scripts above it)."""

    @property
    def sizes(self) -> Sizes:
        return QUICK if self.quick else FULL

    @property
    def report(self) -> Report:
        return Report(self.report_path)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def config(self, variant: str, *overrides: str, training: bool = False):
        """``configs/<variant>.yaml`` with this mode's stacked configs, then ``overrides``."""
        from sat_video.config.loader import load_config

        stacked = self.sizes.train_configs if training else self.sizes.model_configs
        return load_config([self.configs / f"{variant}.yaml", *(self.configs / name for name in stacked)], list(overrides))
