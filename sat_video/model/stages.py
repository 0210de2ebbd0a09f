"""The frozen-stage catalogue: what a first stage (pixels <-> latents) or a text encoder provides.

The DiT composes its mixins through the hook catalogue of :mod:`sat_video.model.hooks`; the diffusion model
composes its frozen stages the same way, through the catalogue below. A frozen stage is a subclass of
:class:`FrozenStage` registered by config type (``@register_stage("video_vae")``, chosen by
``model.first_stage.type`` / ``model.text_encoder.type``) that overrides some of the catalogue methods of
:class:`FrozenStage` (listed in :data:`STAGE_HOOKS`; :func:`stage_table_markdown` renders them for the docs).

Every hook has exactly one provider: :meth:`FrozenStages.add_stage` refuses a stage that provides a hook another
stage already provides, naming both, and leaves the composition as it was. What is frozen about a stage is written
once, here: every module or parameter attached to it stops requiring gradients and stays in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sat_video.common.errors import HookConflictError, MissingHookError, UsageError

SPATIAL_COMPRESSION = 8
"""Pixels per latent along height and width, for every first stage (CogVideoX's VAE: 8x8)."""


@dataclass(frozen=True)
class StageHookSpec:
    name: str
    role: str  # "first stage" or "text encoder": the config section whose type provides it
    section: str  # that section's key, for error messages
    does: str  # what it computes, for the docs


STAGE_HOOKS: tuple[StageHookSpec, ...] = (
    StageHookSpec("encode_moments", "first stage", "model.first_stage",
                  "video `[B, 3, T, H, W]` in [-1, 1] -> posterior `(mean, std)` `[B, C, F, h, w]`, before the scale factor"),
    StageHookSpec("decode_latents", "first stage", "model.first_stage",
                  "latents `[B, C, F, h, w]`, before the scale factor -> video `[B, 3, 1 + 4(F - 1), 8h, 8w]` in [-1, 1]"),
    StageHookSpec("encode_text", "text encoder", "model.text_encoder",
                  "captions -> embeddings `[B, text_length, text_hidden_size]`"),
)


def stage_table_markdown() -> str:
    """:data:`STAGE_HOOKS` as the markdown table ``docs/mixins.md`` shows."""
    rows = ["| stage hook | provided by | what it computes |", "|---|---|---|"]
    rows += [f"| `{spec.name}` | {spec.role} (`{spec.section}.type`) | {spec.does} |" for spec in STAGE_HOOKS]
    return "\n".join(rows)


def latents_from_moments(mean: torch.Tensor, std: torch.Tensor | None, scale_factor: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents from posterior moments: ``(mean + std * noise) * scale_factor``, or ``mean * scale_factor``
    without ``std``. The noise is drawn on the generator's device in the moments' dtype, as diffusers'
    ``DiagonalGaussianDistribution.sample`` draws it, so both give the same latents."""
    if std is not None:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                            device=generator.device if generator is not None else mean.device)
        mean = mean + std * noise.to(mean.device)
    return mean * scale_factor


class FrozenStage(nn.Module):
    """Base class of every frozen stage; its hook methods below are the whole catalogue.

    Frozen means: every module and parameter assigned to the stage has ``requires_grad`` off, and the stage stays in
    eval mode whatever :meth:`train` asks (dropout off), so no trainer can unfreeze it by accident.

    First stages set ``scale_factor`` (``model.first_stage.scale_factor``); :meth:`encode` and :meth:`decode` apply it
    around their hooks.
    """

    scale_factor: float = 1.0
    tiling: bool = False
    """First stage: encoding and decoding run in overlapping spatial tiles (:meth:`set_tiling`)."""
    config_type: ClassVar[str] = ""  # set by @register_stage

    def __init__(self) -> None:
        super().__init__()
        self.training = False

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, nn.Module):
            value.requires_grad_(False).train(False)
        elif isinstance(value, nn.Parameter):
            value.requires_grad_(False)
        super().__setattr__(name, value)

    def train(self, mode: bool = True) -> FrozenStage:
        """Frozen: stays in eval mode whatever ``mode`` asks."""
        return super().train(False)

    def provided_hooks(self) -> list[str]:
        """Catalogue hooks this stage overrides, in catalogue order."""
        return [spec.name for spec in STAGE_HOOKS if getattr(type(self), spec.name) is not getattr(FrozenStage, spec.name)]

    def set_tiling(self, enabled: bool) -> None:
        """First stage: encode and decode in overlapping spatial tiles (less memory, seams blended) or whole (exact).
        A stage that cannot tile refuses ``True``."""
        if enabled:
            raise UsageError(f"{type(self).__name__} cannot encode or decode in tiles")

    # ------------------------------------------------------------------ catalogue

    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """First stage. The posterior of ``video`` ``[B, 3, T, H, W]`` in ``[-1, 1]`` (``T = 1 + 4k``, ``H``, ``W``
        multiples of 8): ``(mean, std)`` ``[B, C, 1 + (T - 1) // 4, H / 8, W / 8]`` before the scale factor, or
        ``(latents, None)`` for a deterministic stage. :func:`latents_from_moments` turns them into latents."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """First stage. Unscaled latents ``[B, C, F, h, w]`` -> clips ``[B, 3, 1 + 4(F - 1), 8h, 8w]`` in ``[-1, 1]``."""
        raise NotImplementedError

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Text encoder. Captions -> embeddings ``[B, text_length, text_hidden_size]`` on the stage's device."""
        raise NotImplementedError

    # ------------------------------------------------------------------ built on the catalogue

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of ``video``: the posterior sampled with ``generator`` (its mean without ``std``) times
        ``scale_factor``, in the stage's dtype."""
        mean, std = self.encode_moments(video)
        return latents_from_moments(mean, std, self.scale_factor, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clips from scaled latents: ``decode_latents(latents / scale_factor)``."""
        return self.decode_latents(latents / self.scale_factor)


class FrozenStages(nn.Module):
    """The frozen part of the diffusion model, composed from stages as the DiT is composed from mixins.

    Stages live under ``stages.<name>``; the trainer and the sampler call the hooks through this object, which
    finds the one stage that provides each. Nothing here trains or enters a checkpoint.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleDict()
        self._providers: dict[str, str] = {}

    def add_stage(self, name: str, stage: FrozenStage) -> FrozenStages:
        """Add ``stage`` under ``name``; refused (nothing added) when another stage already provides one of its hooks."""
        if not isinstance(stage, FrozenStage):
            raise TypeError(f"add_stage('{name}'): expected a FrozenStage, got {type(stage).__name__}")
        if name in self.stages:
            raise ValueError(f"a stage named '{name}' ({type(self.stages[name]).__name__}) is already added")
        provided = stage.provided_hooks()
        for hook in provided:
            if hook in self._providers:
                other = self._providers[hook]
                raise HookConflictError(
                    f"stages '{other}' ({type(self.stages[other]).__name__}) and '{name}' ({type(stage).__name__}) both "
                    f"provide '{hook}'; a diffusion model has one first stage and one text encoder")
        self.stages[name] = stage
        self._providers.update(dict.fromkeys(provided, name))
        return self

    def provider(self, hook: str) -> FrozenStage | None:
        """The stage that provides ``hook``, or ``None``."""
        name = self._providers.get(hook)
        return None if name is None else self.stages[name]

    def _require(self, hook: str) -> FrozenStage:
        stage = self.provider(hook)
        if stage is None:
            spec = next(spec for spec in STAGE_HOOKS if spec.name == hook)
            raise MissingHookError(f"no frozen stage provides '{hook}': this run was built without a {spec.role} "
                                   f"({spec.section})")
        return stage

    @property
    def first_stage(self) -> FrozenStage | None:
        return self.provider("encode_moments")

    @property
    def text_encoder(self) -> FrozenStage | None:
        return self.provider("encode_text")

    def describe_stages(self) -> str:
        """One line per catalogue hook: its role and the stage that provides it."""
        width = max(len(spec.name) for spec in STAGE_HOOKS)
        lines = []
        for spec in STAGE_HOOKS:
            name = self._providers.get(spec.name)
            who = f"{name} ({type(self.stages[name]).__name__})" if name else "(none)"
            lines.append(f"{spec.name:<{width}}  {spec.role:<12}  {who}")
        return "\n".join(lines)

    @contextmanager
    def tiling(self, enabled: bool) -> Iterator[None]:
        """Inside this block the first stage tiles (``enabled``) or not; its setting is restored after."""
        stage = self._require("decode_latents")
        previous = stage.tiling
        stage.set_tiling(enabled)
        try:
            yield
        finally:
            stage.set_tiling(previous)

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._require("encode_moments").encode(video, generator)

    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._require("encode_moments").encode_moments(video)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._require("decode_latents").decode(latents)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        return self._require("encode_text").encode_text(captions)
