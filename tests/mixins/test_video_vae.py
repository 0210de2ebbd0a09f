"""VideoVAEMixin: the CogVideoX 3D causal VAE as the frozen first stage, on TINY_VAE_ARCHITECTURE."""

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKLCogVideoX
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from omegaconf import OmegaConf

import sat_video
from mixins.video_vae import VideoVAEMixin, diffusers_vae_to_sat, sat_vae_to_diffusers
from sat_video.common.errors import ConfigError
from sat_video.fixtures.tiny_vae import TINY_VAE_ARCHITECTURE
from sat_video.model.config import FirstStageConfig
from tests.numerics import assert_identical

SCALE = 0.7


def tiny_config(**overrides) -> FirstStageConfig:
    return FirstStageConfig(
        **{"architecture": dict(TINY_VAE_ARCHITECTURE), "scale_factor": SCALE, "sample_posterior": False, **overrides}
    )


def clip(frames: int, batch: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1


def whole_clip_posterior(vae: AutoencoderKLCogVideoX, video: torch.Tensor) -> DiagonalGaussianDistribution:
    """The chunk-free reference: diffusers' encoder on the whole clip at once (CogVideoX has no quant_conv)."""
    assert vae.quant_conv is None
    with torch.no_grad():
        moments, _ = vae.encoder(video)
    return DiagonalGaussianDistribution(moments)


@pytest.fixture(scope="module")
def first_stage():
    return VideoVAEMixin.from_config(tiny_config())


def test_shapes_and_range(first_stage):
    latents = first_stage.encode(clip(9, batch=2))
    assert latents.shape == (2, 16, 3, 4, 4)
    video = first_stage.decode(latents)
    assert video.shape == (2, 3, 9, 32, 32)
    assert video.min() >= -1 and video.max() <= 1


def test_encode_is_the_scaled_posterior_mode(first_stage):
    video = clip(9)
    expected = whole_clip_posterior(first_stage.vae, video).mode() * SCALE
    assert_identical(first_stage.encode(video), expected)
    assert_identical(first_stage.encode(video), first_stage.vae.encode(video).latent_dist.mode() * SCALE)


def test_encodes_17_frames_in_one_pass(first_stage):
    video = clip(17)
    latents = first_stage.encode(video)
    assert latents.shape == (1, 16, 5, 4, 4)
    assert_identical(latents, whole_clip_posterior(first_stage.vae, video).mode() * SCALE)
    # diffusers' default 8-frame chunks give other latents: the whole-clip setting is what makes them SAT's.
    chunked = AutoencoderKLCogVideoX(**TINY_VAE_ARCHITECTURE)
    chunked.load_state_dict(first_stage.vae.state_dict())
    with torch.no_grad():
        chunked_latents = chunked.encode(video).latent_dist.mode() * SCALE
    assert (chunked_latents - latents).abs().max() > 1e-4


def test_posterior_sample_uses_the_generator():
    sampling = VideoVAEMixin.from_config(tiny_config(sample_posterior=True))
    video = clip(5)
    latents = sampling.encode(video, generator=torch.Generator().manual_seed(7))
    posterior = whole_clip_posterior(sampling.vae, video)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert_identical(latents, (posterior.mean + posterior.std * noise) * SCALE)
    other = sampling.encode(video, generator=torch.Generator().manual_seed(8))
    assert (other - latents).abs().max() > 1e-4


def test_decode_divides_by_the_scale_factor(first_stage):
    latents = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = first_stage.vae.decode(latents / SCALE).sample.clamp(-1, 1)
    video = first_stage.decode(latents)
    assert video.shape == (1, 3, 17, 32, 32)
    assert_identical(video, expected)


def test_random_weights_follow_init_seed_only():
    rng_state = torch.random.get_rng_state()
    first = VideoVAEMixin.from_config(tiny_config(init_seed=5)).state_dict()
    torch.manual_seed(123)  # the global seed plays no part
    second = VideoVAEMixin.from_config(tiny_config(init_seed=5)).state_dict()
    other = VideoVAEMixin.from_config(tiny_config(init_seed=6)).state_dict()
    torch.random.set_rng_state(rng_state)
    third = VideoVAEMixin.from_config(tiny_config(init_seed=5))
    assert torch.equal(rng_state, torch.random.get_rng_state())
    assert all(torch.equal(first[name], second[name]) and torch.equal(first[name], third.state_dict()[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_diffusers_folder_round_trip(first_stage, tmp_path):
    first_stage.vae.save_pretrained(tmp_path / "vae")
    with pytest.warns(UserWarning, match=r"model\.first_stage\.scale_factor is 0\.7 but .* has scaling_factor 1\.15258426"):
        loaded = VideoVAEMixin.from_config(tiny_config(path=str(tmp_path / "vae"), architecture={}))
    video = clip(9)
    assert_identical(loaded.encode(video), first_stage.encode(video))
    latents = first_stage.encode(video)
    assert_identical(loaded.decode(latents), first_stage.decode(latents))


def test_diffusers_folder_disagreeing_with_architecture(first_stage, tmp_path):
    first_stage.vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ConfigError, match=r"model\.first_stage\.architecture\.layers_per_block is 2 but .*config\.json has 1"):
        VideoVAEMixin.from_config(tiny_config(path=str(tmp_path / "vae"), architecture={"layers_per_block": 2}))


def test_sat_key_names(first_stage):
    sat_state = diffusers_vae_to_sat(first_stage.vae.state_dict())
    # Names as SAT's vae_modules/cp_enc_dec.py builds them: decoder levels counted from the output end,
    # level 0 without an upsampler; 1x1 shortcuts are nin_shortcut.
    for key in (
        "encoder.conv_in.conv.weight",
        "encoder.down.1.block.0.conv1.conv.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.block_2.norm2.weight",
        "decoder.mid.block_1.norm1.conv_y.conv.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.norm_out.norm_layer.weight",
    ):
        assert key in sat_state, key
    assert not any(key.startswith("decoder.up.0.upsample") for key in sat_state)
    assert sat_vae_to_diffusers(sat_state).keys() == first_stage.vae.state_dict().keys()


@pytest.mark.parametrize(
    "file_name, prefix", [("3d-vae.pt", ""), ("engine.pt", "first_stage_model."), ("3d-vae.safetensors", "")]
)
def test_sat_checkpoint_round_trip(first_stage, tmp_path, file_name, prefix):
    sat_state = {prefix + key: value for key, value in diffusers_vae_to_sat(first_stage.vae.state_dict()).items()}
    sat_state[prefix + "loss.logvar"] = torch.zeros(())  # SAT's files carry the VAE's training loss
    if prefix:
        sat_state["model.diffusion_model.mixins.patch_embed.proj.weight"] = torch.zeros(2)
    path = tmp_path / file_name
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(sat_state, path)
    else:
        torch.save({"state_dict": sat_state}, path)
    loaded = VideoVAEMixin.from_config(tiny_config(path=str(path)))
    video = clip(9)
    assert_identical(loaded.encode(video), first_stage.encode(video))
    latents = first_stage.encode(video)
    assert_identical(loaded.decode(latents), first_stage.decode(latents))


def test_sat_checkpoint_with_a_wrong_key(first_stage, tmp_path):
    sat_state = diffusers_vae_to_sat(first_stage.vae.state_dict())
    sat_state["encoder.conv_in.conv.kernel"] = sat_state.pop("encoder.conv_in.conv.weight")
    path = tmp_path / "3d-vae.pt"
    torch.save({"state_dict": sat_state}, path)
    with pytest.raises(
        ValueError,
        match=r"3d-vae\.pt does not match.*missing keys \(1\): encoder\.conv_in\.conv\.weight; "
        r"unexpected keys \(1\): encoder\.conv_in\.conv\.kernel",
    ):
        VideoVAEMixin.from_config(tiny_config(path=str(path)))
    with pytest.raises(ValueError, match=r"shape mismatches \(\d+\): decoder\.conv_in\.conv\.bias \(16,\) \(expected \(512,\)\)"):
        VideoVAEMixin.from_config(tiny_config(path=str(path), architecture={}))  # CogVideoX's full-size VAE


def test_missing_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.first_stage\.path: not found: .*3d-vae\.pt"):
        VideoVAEMixin.from_config(tiny_config(path=str(tmp_path / "3d-vae.pt")))


def test_unknown_architecture_key():
    with pytest.raises(ConfigError, match=r"model\.first_stage\.architecture: unknown .* block_channels"):
        VideoVAEMixin.from_config(tiny_config(architecture={"block_channels": [8, 8, 16, 16]}))


def test_tiny_architecture_from_yaml(first_stage):
    text = OmegaConf.to_yaml({"model": {"first_stage": {"architecture": TINY_VAE_ARCHITECTURE, "scale_factor": SCALE}}})
    cfg = sat_video.load_config(OmegaConf.to_container(OmegaConf.create(text)))
    from_yaml = VideoVAEMixin.from_config(cfg.model.first_stage)
    assert from_yaml.vae.config.block_out_channels == TINY_VAE_ARCHITECTURE["block_out_channels"]
    assert all(torch.equal(value, first_stage.state_dict()[name]) for name, value in from_yaml.state_dict().items())


def test_frozen(first_stage):
    assert not any(param.requires_grad for param in first_stage.parameters())
    first_stage.train()
    assert not any(module.training for module in first_stage.modules())
