"""PatchPCAFirstStage: a linear first stage with the compression of CogVideoX's VAE, fitted in seconds.

The built-in demo trains on a CPU in minutes: a random VAE decodes to noise and a real one cannot be
trained in that time, so the demo's first stage is PCA. Each 8x8 patch of the first frame and each
4-frame x 8x8 tube of the later frames is projected on the top principal components of such patches
(one basis for first frames, one for tubes) and whitened, so latents have the VAE's shape
``[B, 16, 1 + (T - 1) / 4, H / 8, W / 8]``, its causality (the first latent frame sees only the first
frame) and about unit variance per channel, the scale diffusion noise assumes. It is an honest stand-in
for data like the fitted clips, not a general video codec.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sat_video.common.errors import CheckpointError, ConfigError, OutputExistsError
from sat_video.common.files import atomic_write
from sat_video.model.config import FirstStageConfig
from sat_video.model.registry import register_stage
from sat_video.model.stages import SPATIAL_COMPRESSION, FrozenStage

PATCH_SIZE = SPATIAL_COMPRESSION
"""Pixels per latent along height and width, as CogVideoX's VAE."""
FRAMES_PER_TUBE = 4
"""Temporal compression after the first frame, as CogVideoX's VAE."""
RGB = 3
MIN_EIGENVALUE_RATIO = 1e-8
"""A component whose variance is below this share of the largest one carries no signal; whitening it would
turn rounding noise into a unit-variance latent channel, so :meth:`PatchPCAFirstStage.fit` refuses."""


def _patches(video: torch.Tensor, frames_per_patch: int) -> torch.Tensor:
    """``[B, 3, F * frames_per_patch, 8h, 8w]`` -> ``[B, F, h, w, 3 * frames_per_patch * 8 * 8]``."""
    batch, _, frames, height, width = video.shape
    tubes = video.reshape(batch, RGB, frames // frames_per_patch, frames_per_patch,
                          height // PATCH_SIZE, PATCH_SIZE, width // PATCH_SIZE, PATCH_SIZE)
    tubes = tubes.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, F, h, w, 3, frames_per_patch, 8, 8]
    return tubes.flatten(4)


def _unpatch(patches: torch.Tensor, frames_per_patch: int) -> torch.Tensor:
    """Inverse of :func:`_patches`."""
    batch, frames, height, width, _ = patches.shape
    tubes = patches.reshape(batch, frames, height, width, RGB, frames_per_patch, PATCH_SIZE, PATCH_SIZE)
    tubes = tubes.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, 3, F, frames_per_patch, h, 8, w, 8]
    return tubes.reshape(batch, RGB, frames * frames_per_patch, height * PATCH_SIZE, width * PATCH_SIZE)


def _check_video_shape(shape: torch.Size | tuple[int, ...], where: str) -> None:
    frames, height, width = shape[-3:]
    if (frames - 1) % FRAMES_PER_TUBE or height % PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(
            f"{where}: frames must be 1 + {FRAMES_PER_TUBE}k and height, width multiples of {PATCH_SIZE}, "
            f"found {frames} frames of {height}x{width}"
        )


class PatchBasis(torch.nn.Module):
    """Whitened PCA of one kind of patch: ``latent = basis (patch - mean) / std`` and back.

    Args:
        mean: ``[D]``, the mean patch.
        basis: ``[C, D]``, orthonormal principal directions, largest variance first.
        std: ``[C]``, the standard deviation of the patches along each direction.
    """

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("basis", basis)
        self.register_buffer("std", std)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., C]``."""
        return (patches - self.mean) @ self.basis.T / self.std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[..., C]`` -> ``[..., D]``: the closest patch in the span of the basis (the basis is orthonormal)."""
        return (latents * self.std) @ self.basis + self.mean

    @classmethod
    def fit(cls, patches: torch.Tensor, latent_channels: int, kind: str) -> PatchBasis:
        """Top ``latent_channels`` principal components of ``patches`` ``[N, D]``, computed in float64.

        The variance divides by N, so the fitted patches encode to exactly unit variance per channel.
        """
        count, dim = patches.shape
        if count < latent_channels:
            raise ValueError(f"PatchPCAFirstStage.fit: found {count} {kind}, need at least latent_channels ({latent_channels})")
        chunks = patches.split(16384)  # bounds the float64 copies
        mean = sum(chunk.double().sum(0) for chunk in chunks) / count
        covariance = torch.zeros(dim, dim, dtype=torch.float64)
        for chunk in chunks:
            centered = chunk.double() - mean
            covariance += centered.T @ centered
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance / count)  # ascending
        eigenvalues = eigenvalues.flip(0)[:latent_channels]
        basis = eigenvectors.flip(1)[:, :latent_channels].T  # [C, D]
        useful = int((eigenvalues > MIN_EIGENVALUE_RATIO * eigenvalues[0]).sum())
        if useful < latent_channels:
            raise ValueError(
                f"PatchPCAFirstStage.fit: the {kind} vary along only {useful} directions, fewer than latent_channels "
                f"({latent_channels}); fit on more varied clips"
            )
        # eigh fixes each direction only up to sign: make its largest entry positive so fits are reproducible.
        largest = basis.gather(1, basis.abs().argmax(1, keepdim=True))
        basis = basis * largest.sign()
        return cls(mean.float(), basis.float().contiguous(), eigenvalues.sqrt().float())


class _UniformSubset:
    """A uniform random subset of at most ``capacity`` rows of a stream: each row gets a random key and the
    ``capacity`` smallest keys win. Held rows are pruned to the winners whenever they pass twice ``capacity``;
    from then on rows keyed above the last winner are dropped on arrival, so memory stays bounded."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity = capacity
        self.generator = generator
        self.rows: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.count = 0
        self.threshold = 1.0

    def add(self, rows: torch.Tensor) -> None:
        # float64 keys: float32 ones tie every few thousand rows, and ties would let the subset exceed capacity.
        keys = torch.rand(len(rows), generator=self.generator, dtype=torch.float64)
        kept = keys < self.threshold
        self.rows.append(rows[kept])
        self.keys.append(keys[kept])
        self.count += int(kept.sum())
        if self.count > 2 * self.capacity:
            self._prune()

    def _prune(self) -> None:
        self.threshold = torch.cat(self.keys).kthvalue(self.capacity).values.item()
        pending = list(zip(self.rows, self.keys))
        self.rows, self.keys = [], []
        while pending:  # frees each chunk once pruned, so two whole copies never coexist
            rows, keys = pending.pop(0)
            kept = keys <= self.threshold
            self.rows.append(rows[kept])
            self.keys.append(keys[kept])
        self.count = sum(len(keys) for keys in self.keys)

    def take(self, dim: int) -> torch.Tensor:
        """The subset ``[N, dim]``; the stream's chunks are released."""
        if self.count > self.capacity:
            self._prune()
        rows = torch.cat(self.rows) if self.rows else torch.empty(0, dim)
        self.rows, self.keys = [], []
        return rows


@register_stage("patch_pca")
class PatchPCAFirstStage(FrozenStage):
    """Frozen linear first stage: clips in ``[-1, 1]`` to scaled latents and back, with the VAE's interface.

    Build it with :meth:`fit`, keep it with :meth:`save`, and use it through ``model.first_stage``
    (``type: patch_pca``, ``path``: the saved file) via :meth:`from_config`.

    Args:
        first_frame (`PatchBasis`): PCA of the 3 x 8 x 8 patches of first frames (192 values).
        frame_groups (`PatchBasis`): PCA of the 3 x 4 x 8 x 8 tubes of later frames (768 values), with as
            many components as ``first_frame``.
        scale_factor (`float`, defaults to 1.0): latents are multiplied by it after encoding and divided
            before decoding, as ``VideoVAEMixin``; the latents are already whitened, so 1.0 suits them.
    """

    def __init__(self, first_frame: PatchBasis, frame_groups: PatchBasis, scale_factor: float = 1.0):
        super().__init__()
        self.first_frame = first_frame
        self.frame_groups = frame_groups
        self.scale_factor = scale_factor

    @property
    def latent_channels(self) -> int:
        return self.first_frame.basis.shape[0]

    @classmethod
    def fit(cls, clips: Iterable[torch.Tensor], latent_channels: int = 16, max_patches: int = 200_000,
            seed: int = 0) -> PatchPCAFirstStage:
        """Fit both bases to the patches of ``clips``.

        Args:
            clips: ``[3, T, H, W]`` in ``[-1, 1]`` (``load_clip``'s output), ``T = 1 + 4k`` and ``H``, ``W``
                multiples of 8; sizes may differ between clips. Read once, so a generator is fine.
            latent_channels: principal components kept (16: the DiT's ``in_channels``).
            max_patches: at most this many first-frame patches and this many tubes are used, a uniform random
                subset; it bounds memory (a tube is 768 floats) and time.
            seed: seeds that subset; the same clips and seed give the same first stage.
        Raises:
            ValueError: a clip of the wrong shape, too few patches, or clips too uniform to fill
                ``latent_channels`` components.
        """
        first_dim = RGB * PATCH_SIZE**2
        if not 1 <= latent_channels <= first_dim:
            raise ValueError(f"PatchPCAFirstStage.fit: latent_channels must be between 1 and {first_dim}, "
                             f"found {latent_channels}")
        if max_patches < latent_channels:
            raise ValueError(
                f"PatchPCAFirstStage.fit: max_patches must be at least latent_channels ({latent_channels}), found {max_patches}"
            )
        generator = torch.Generator().manual_seed(seed)
        first_patches = _UniformSubset(max_patches, generator)
        tubes = _UniformSubset(max_patches, generator)
        for index, clip in enumerate(clips):
            if clip.ndim != 4 or clip.shape[0] != RGB:
                raise ValueError(f"PatchPCAFirstStage.fit: clip {index}: expected [3, T, H, W], found {list(clip.shape)}")
            _check_video_shape(clip.shape, f"PatchPCAFirstStage.fit: clip {index}")
            video = clip[None].float()
            first_patches.add(_patches(video[:, :, :1], 1).flatten(0, 3))
            if video.shape[2] > 1:
                tubes.add(_patches(video[:, :, 1:], FRAMES_PER_TUBE).flatten(0, 3))
        return cls(
            PatchBasis.fit(first_patches.take(first_dim), latent_channels, "first-frame patches"),
            PatchBasis.fit(tubes.take(FRAMES_PER_TUBE * first_dim), latent_channels, "4-frame tubes"),
        )

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the bases as safetensors; the file appears whole or not at all (temporary file, then rename).

        ``scale_factor`` is not saved: it belongs to the config (``model.first_stage.scale_factor``).
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, str(temp)))
        return path

    @classmethod
    def load(cls, path: str | Path, scale_factor: float = 1.0) -> PatchPCAFirstStage:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not a safetensors file, or its keys or shapes are not those of a PatchPCAFirstStage.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (write one with PatchPCAFirstStage.fit(clips).save(path))")
        try:
            tensors = safetensors.torch.load_file(path)
        except safetensors.SafetensorError as err:
            raise CheckpointError(f"{path}: not a safetensors file ({err})") from None
        first_dim = RGB * PATCH_SIZE**2
        dit_config = {"first_frame": first_dim, "frame_groups": FRAMES_PER_TUBE * first_dim}
        expected_keys = {f"{prefix}.{name}" for prefix in dit_config for name in ("mean", "basis", "std")}
        if tensors.keys() != expected_keys:
            raise ValueError(
                f"{path}: not a PatchPCAFirstStage file: expected keys {sorted(expected_keys)}, found {sorted(tensors)}"
            )
        channels = tensors["first_frame.std"].shape[0] if tensors["first_frame.std"].ndim == 1 else -1
        expected_shapes = {}
        for prefix, dim in dit_config.items():
            expected_shapes |= {f"{prefix}.mean": (dim,), f"{prefix}.basis": (channels, dim), f"{prefix}.std": (channels,)}
        mismatched = [
            f"{key} {tuple(tensors[key].shape)} (expected {shape})"
            for key, shape in sorted(expected_shapes.items())
            if tuple(tensors[key].shape) != shape
        ]
        if mismatched:
            raise CheckpointError(f"{path}: shape mismatches (C: latent channels, from first_frame.std): {', '.join(mismatched)}")
        bases = {prefix: PatchBasis(*(tensors[f"{prefix}.{name}"] for name in ("mean", "basis", "std"))) for prefix in dit_config}
        return cls(bases["first_frame"], bases["frame_groups"], scale_factor)

    @classmethod
    def from_config(cls, cfg: FirstStageConfig) -> PatchPCAFirstStage:
        """Load ``model.first_stage.path`` with ``model.first_stage.scale_factor``.

        ``architecture``, ``sample_posterior`` and ``init_seed`` are the VAE's settings and do not apply:
        the projection is fixed and deterministic.
        """
        if cfg.path is None:
            raise ConfigError(
                "model.first_stage.path: type patch_pca needs the file of a fitted first stage "
                "(PatchPCAFirstStage.fit(clips).save(path)), found null"
            )
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.first_stage.path: not found: {path}")
        return cls.load(path, cfg.scale_factor)

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``(latents before scale_factor, None)``: the projection is deterministic (no posterior to sample)."""
        if video.ndim != 5 or video.shape[1] != RGB:
            raise ValueError(f"PatchPCAFirstStage.encode: expected video [B, 3, T, H, W], found {list(video.shape)}")
        _check_video_shape(video.shape, "PatchPCAFirstStage.encode")
        video = video.to(self.first_frame.basis.dtype)
        latents = self.first_frame.encode(_patches(video[:, :, :1], 1))  # [B, 1, h, w, C]
        if video.shape[2] > 1:
            later = self.frame_groups.encode(_patches(video[:, :, 1:], FRAMES_PER_TUBE))  # [B, (T - 1) / 4, h, w, C]
            latents = torch.cat([latents, later], dim=1)
        return latents.permute(0, 4, 1, 2, 3), None  # [B, C, F, h, w]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode unscaled latents ``[B, C, F, h, w]`` to clips ``[B, 3, 1 + 4(F - 1), 8h, 8w]`` in ``[-1, 1]``."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"PatchPCAFirstStage.decode: expected latents [B, {self.latent_channels}, F, h, w], found {list(latents.shape)}"
            )
        latents = latents.to(self.first_frame.basis.dtype).permute(0, 2, 3, 4, 1)  # [B, F, h, w, C]
        video = _unpatch(self.first_frame.decode(latents[:, :1]), 1)
        if latents.shape[1] > 1:
            later = _unpatch(self.frame_groups.decode(latents[:, 1:]), FRAMES_PER_TUBE)
            video = torch.cat([video, later], dim=2)
        return video.clamp(-1.0, 1.0)
