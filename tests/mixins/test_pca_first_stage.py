"""PatchPCAFirstStage: the fitted linear first stage of the demo, on real mp4 clips of moving shapes."""

import copy
import math

import pytest
import safetensors.torch
import torch

from mixins.pca_first_stage import PatchPCAFirstStage
from sat_video.common.errors import ConfigError
from sat_video.data.clips import ClipSpec, load_clip
from sat_video.data.sources import discover
from sat_video.fixtures.synthetic import make_moving_shapes
from sat_video.model.config import FirstStageConfig
from tests.numerics import assert_close_rel, assert_identical

FRAMES, SIZE = 9, 64
NUM_FITTED = 12
"""Videos 0-11 fit the first stage; videos 12-15 (other shapes, colours, sizes and paths) are held out."""


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of clips in ``[-1, 1]`` (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / (reconstruction - original).pow(2).mean().item())


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> torch.Tensor:
    root = tmp_path_factory.mktemp("moving_shapes")
    make_moving_shapes(root, num_videos=16, num_frames=FRAMES, height=SIZE, width=SIZE, fps=8, seed=0)
    spec = ClipSpec(FRAMES, SIZE, SIZE, fps=8)
    return torch.stack([load_clip(ref, spec)[0] for ref in discover([root])])  # [16, 3, T, H, W]


@pytest.fixture(scope="module")
def first_stage(clips) -> PatchPCAFirstStage:
    return PatchPCAFirstStage.fit(clips[:NUM_FITTED])


def test_shapes_and_range(first_stage, clips):
    latents = first_stage.encode(clips[:2])
    assert latents.shape == (2, 16, 3, SIZE // 8, SIZE // 8)
    video = first_stage.decode(latents)
    assert video.shape == clips[:2].shape
    assert video.min() >= -1 and video.max() <= 1
    longer = torch.cat([clips[:1], clips[:1, :, 1:5]], dim=2)  # 13 frames of 32x48
    assert first_stage.encode(longer[..., :32, :48]).shape == (1, 16, 4, 4, 6)
    assert first_stage.decode(torch.zeros(1, 16, 4, 4, 6)).shape == (1, 3, 13, 32, 48)


def test_an_image_is_one_latent_frame(first_stage, clips):
    image = clips[:1, :, :1]
    latents = first_stage.encode(image)
    assert latents.shape == (1, 16, 1, SIZE // 8, SIZE // 8)
    assert first_stage.decode(latents).shape == image.shape
    assert_close_rel(latents, first_stage.encode(clips[:1])[:, :, :1])  # a matmul over fewer rows may block differently


def test_fitted_latents_have_unit_variance_per_channel(first_stage, clips):
    latents = first_stage.encode(clips[:NUM_FITTED]).transpose(0, 1).flatten(1)  # [C, everything else]
    # absolute bounds on purpose: the latents' scale is 1 by construction
    assert latents.mean(1).abs().max() < 1e-4
    assert (latents.var(1, correction=0) - 1).abs().max() < 1e-3
    held_out = first_stage.encode(clips[NUM_FITTED:]).transpose(0, 1).flatten(1)
    assert held_out.var(1).min() > 0.25 and held_out.var(1).max() < 4


def test_reconstructs_held_out_clips(first_stage, clips):
    held_out = clips[NUM_FITTED:]
    reconstruction = first_stage.decode(first_stage.encode(held_out))
    whole, first = psnr(reconstruction, held_out), psnr(reconstruction[:, :, :1], held_out[:, :, :1])
    # One flat colour per clip (the best constant) scores about 13.5 dB; measured here: 22.4 dB, first frame 26.0 dB.
    flat = psnr(held_out.mean(dim=(2, 3, 4), keepdim=True).expand_as(held_out), held_out)
    assert whole > 20.0 and whole > flat + 6.0, f"held-out PSNR {whole:.2f} dB (flat colour: {flat:.2f} dB)"
    assert first > 24.0, f"held-out first-frame PSNR {first:.2f} dB"


def test_causal_in_time(first_stage, clips):
    video = clips[:1]
    latents = first_stage.encode(video)
    later_changed = video.clone()
    later_changed[:, :, 1:] = torch.rand(later_changed[:, :, 1:].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    changed_latents = first_stage.encode(later_changed)
    assert torch.equal(changed_latents[:, :, 0], latents[:, :, 0])
    assert not torch.allclose(changed_latents[:, :, 1:], latents[:, :, 1:])
    last_group_changed = video.clone()
    last_group_changed[:, :, 5:] = 0.0
    assert torch.equal(first_stage.encode(last_group_changed)[:, :, :2], latents[:, :, :2])


def test_fit_is_deterministic_and_reads_a_stream_once(first_stage, clips):
    refit = PatchPCAFirstStage.fit(clip for clip in clips[:NUM_FITTED])
    for key, value in first_stage.state_dict().items():
        assert torch.equal(refit.state_dict()[key], value), key
    # 768 first-frame patches and 1536 tubes: max_patches=500 takes a random subset of each, chosen by the seed.
    subset = PatchPCAFirstStage.fit(clips[:NUM_FITTED], max_patches=500, seed=1)
    same_seed = PatchPCAFirstStage.fit(clips[:NUM_FITTED], max_patches=500, seed=1)
    for key, value in subset.state_dict().items():
        assert torch.equal(same_seed.state_dict()[key], value), key
    other_seed = PatchPCAFirstStage.fit(clips[:NUM_FITTED], max_patches=500, seed=2)
    for key in ("first_frame.mean", "frame_groups.mean"):
        assert not torch.equal(other_seed.state_dict()[key], subset.state_dict()[key])
        assert not torch.equal(first_stage.state_dict()[key], subset.state_dict()[key])


def test_save_load_round_trip(first_stage, clips, tmp_path):
    path = first_stage.save(tmp_path / "first_stage.safetensors")
    assert [file.name for file in tmp_path.iterdir()] == ["first_stage.safetensors"]  # no temporary file left
    loaded = PatchPCAFirstStage.load(path)
    assert loaded.state_dict().keys() == first_stage.state_dict().keys()
    for key, value in first_stage.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.encode(clips[:2]), first_stage.encode(clips[:2]))

    with pytest.raises(FileExistsError, match="overwrite=True"):
        first_stage.save(path)
    first_stage.save(path, overwrite=True)


def test_from_config_scales_like_the_vae(first_stage, clips, tmp_path):
    path = first_stage.save(tmp_path / "first_stage.safetensors")
    scaled = PatchPCAFirstStage.from_config(FirstStageConfig(type="patch_pca", path=str(path), scale_factor=0.7))
    latents = scaled.encode(clips[:1])
    assert_identical(latents, first_stage.encode(clips[:1]) * 0.7)
    # x * 0.7 / 0.7 need not be x in float32
    assert_close_rel(scaled.decode(latents), first_stage.decode(first_stage.encode(clips[:1])))


def test_frozen(first_stage, clips):
    assert not any(param.requires_grad for param in first_stage.parameters())
    first_stage.train()
    assert not first_stage.training
    video = clips[:1].clone().requires_grad_(True)
    assert not first_stage.encode(video).requires_grad


def test_follows_the_module_dtype(first_stage, clips):
    half = copy.deepcopy(first_stage).to(torch.bfloat16)  # as the trainer casts its frozen stages
    latents = half.encode(clips[:1])
    assert latents.dtype == torch.bfloat16
    assert half.decode(latents.float()).dtype == torch.bfloat16


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 8, 64, 64), "1 \\+ 4k"),
    ((1, 3, 9, 60, 64), "found 9 frames of 60x64"),
    ((3, 9, 64, 64), r"expected video \[B, 3, T, H, W\], found \[3, 9, 64, 64\]"),
    ((1, 4, 9, 64, 64), r"found \[1, 4, 9, 64, 64\]"),
])
def test_encode_rejects_bad_shapes(first_stage, shape, message):
    with pytest.raises(ValueError, match=message):
        first_stage.encode(torch.zeros(shape))


def test_decode_rejects_wrong_channels(first_stage):
    with pytest.raises(ValueError, match=r"expected latents \[B, 16, F, h, w\], found \[1, 8, 3, 8, 8\]"):
        first_stage.decode(torch.zeros(1, 8, 3, 8, 8))


def test_fit_errors(clips):
    with pytest.raises(ValueError, match="clip 1: frames must be 1 \\+ 4k"):
        PatchPCAFirstStage.fit([clips[0], clips[1, :, :8]])
    flat_colours = torch.rand(20, 3, 1, 1, 1, generator=torch.Generator().manual_seed(0)).expand(-1, -1, 9, 64, 64)
    with pytest.raises(ValueError, match="first-frame patches vary along only 3 directions, fewer than latent_channels"):
        PatchPCAFirstStage.fit(flat_colours)
    with pytest.raises(ValueError, match=r"found 0 4-frame tubes, need at least latent_channels \(16\)"):
        PatchPCAFirstStage.fit(clips[:, :, :1])  # images only


def test_load_and_from_config_errors(first_stage, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors: not found"):
        PatchPCAFirstStage.load(missing)
    with pytest.raises(ConfigError, match="model.first_stage.path: not found: .*missing.safetensors"):
        PatchPCAFirstStage.from_config(FirstStageConfig(type="patch_pca", path=str(missing)))
    with pytest.raises(ConfigError, match="model.first_stage.path: type patch_pca needs"):
        PatchPCAFirstStage.from_config(FirstStageConfig(type="patch_pca"))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="garbage.safetensors: not a safetensors file"):
        PatchPCAFirstStage.load(garbage)

    tensors = dict(first_stage.state_dict())
    wrong_keys = tmp_path / "wrong_keys.safetensors"
    safetensors.torch.save_file({**tensors, "extra": torch.zeros(1)}, wrong_keys)
    expected = r"wrong_keys.safetensors: not a PatchPCAFirstStage file: expected keys .* found .*'extra'"
    with pytest.raises(ValueError, match=expected):
        PatchPCAFirstStage.load(wrong_keys)

    wrong_shape = tmp_path / "wrong_shape.safetensors"
    safetensors.torch.save_file({**tensors, "frame_groups.basis": tensors["frame_groups.basis"][:8].contiguous()}, wrong_shape)
    with pytest.raises(
        ValueError, match=r"wrong_shape.safetensors: shape mismatches .*frame_groups.basis \(8, 768\) \(expected \(16, 768\)\)"
    ):
        PatchPCAFirstStage.load(wrong_shape)
