"""The training step in process: frozen stages (VAE, T5, caption dropout, I2V condition) and the v-loss."""

import dataclasses

import pytest
import torch

from mixins.t5_encoder import T5TextEncoder
from mixins.video_vae import VideoVAEMixin
from sat_video import build_dit
from sat_video.diffusion.conditioning import TrainingInputBuilder
from sat_video.diffusion.config import DiffusionConfig
from sat_video.diffusion.loss import DiffusionLoss
from sat_video.diffusion.schedule import NoiseSchedule
from sat_video.fixtures.tiny_t5 import make_tiny_t5
from sat_video.fixtures.tiny_vae import TINY_VAE_ARCHITECTURE
from sat_video.model.config import DiTConfig, FirstStageConfig, TextEncoderConfig
from sat_video.model.stages import FrozenStages
from tests.conftest import tiny_config
from tests.numerics import assert_close_rel

CAPTIONS = ["a red circle moving left", "a blue square moving up"]


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return make_tiny_t5(CAPTIONS, tmp_path_factory.mktemp("t5") / "t5", d_model=32)


def frozen_stages(cfg, t5_folder, sample_posterior=True, **diffusion):
    dit_config = DiTConfig.from_config(cfg)
    vae = VideoVAEMixin.from_config(
        FirstStageConfig(architecture=TINY_VAE_ARCHITECTURE, scale_factor=0.7, sample_posterior=sample_posterior))
    text = T5TextEncoder.from_config(TextEncoderConfig(path=str(t5_folder)), dit_config.text_length, dit_config.text_hidden_size)
    stages = FrozenStages().add_stage("first_stage_model", vae).add_stage("conditioner", text)
    return TrainingInputBuilder(dit_config, DiffusionConfig(**diffusion), stages)


def smooth_video(batch=2, frames=13, size=64, seed=0):
    """Low-frequency content, so that VAE latents of related frames are clearly correlated."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, frames, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(frames, size, size), mode="trilinear")


def correlation(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_i2v_condition_is_the_encoded_noisy_first_frame(t5_folder):
    cfg = tiny_config("cogvideox_5b_i2v")
    # the posterior mean: a random VAE's posterior noise would hide the relation between the two encodings
    stages = frozen_stages(cfg, t5_folder, sample_posterior=False, image_dropout=0.0, text_dropout=0.0)
    video = smooth_video()
    inputs = stages.prepare(video, CAPTIONS, torch.Generator().manual_seed(0))
    condition = inputs.image_latents
    assert inputs.latents.shape == condition.shape == (2, 4, 16, 8, 8)  # [B, T, C, H, W]: 13 frames -> 4 latent frames
    assert torch.count_nonzero(condition[:, 1:]) == 0  # zero latents after the first frame

    # exactly the VAE encoding of the first frame plus pixel noise with sigma = exp(N(-3, 0.5)), drawn in
    # prepare's order: caption dropout, sigma, pixel noise, image dropout
    generator = torch.Generator().manual_seed(0)
    torch.rand(2, generator=generator)
    sigma = torch.exp(torch.randn(2, generator=generator) * 0.5 - 3.0)
    noisy_first = video[:, :, :1] + sigma.view(-1, 1, 1, 1, 1) * torch.randn(2, 3, 1, 64, 64, generator=generator)
    expected = stages.stages.first_stage.encode(noisy_first).permute(0, 2, 1, 3, 4)
    assert_close_rel(condition[:, :1], expected)

    clean_first = stages.stages.first_stage.encode(video[:, :, :1])[:, :, 0]
    pure_noise = stages.stages.first_stage.encode(torch.randn(2, 3, 1, 64, 64, generator=generator))[:, :, 0]
    for sample in range(2):
        assert correlation(condition[sample, 0], clean_first[sample]) > 0.95  # the image, slightly noised ...
        assert not torch.allclose(condition[sample, 0], clean_first[sample], atol=1e-3)
        assert abs(correlation(condition[sample, 0], pure_noise[sample])) < 0.5  # ... never pure noise
        assert correlation(condition[sample, 0], inputs.latents[sample, 0]) > 0.8  # and it tracks the clip's first latent


def test_dropouts_zero_text_and_image_condition(t5_folder):
    cfg = tiny_config("cogvideox_5b_i2v")
    video = smooth_video()
    kept = frozen_stages(cfg, t5_folder, image_dropout=0.0, text_dropout=0.0).prepare(video, CAPTIONS, torch.Generator())
    assert kept.text.abs().sum(dim=(1, 2)).min() > 0
    dropped = frozen_stages(cfg, t5_folder, image_dropout=1.0, text_dropout=1.0).prepare(video, CAPTIONS, torch.Generator())
    assert torch.count_nonzero(dropped.text) == 0 and torch.count_nonzero(dropped.image_latents) == 0
    # at the default 10% per sample, about a tenth of 400 captions are dropped
    stages = frozen_stages(cfg, t5_folder)
    stages.stages.first_stage.encode = lambda video, generator=None: torch.zeros(video.shape[0], 16, 1, 8, 8)
    inputs = stages.prepare(torch.zeros(400, 3, 1, 64, 64), ["a red circle moving left"] * 400, torch.Generator().manual_seed(0))
    dropped_share = float((inputs.text.abs().sum(dim=(1, 2)) == 0).float().mean())
    assert 0.05 < dropped_share < 0.15


def test_i2v_training_step_reaches_the_image_channels(t5_folder):
    cfg = tiny_config("cogvideox_5b_i2v")
    torch.manual_seed(0)
    diffusion_loss = DiffusionLoss(build_dit(cfg), NoiseSchedule(1.0))
    stages = frozen_stages(cfg, t5_folder, image_dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    inputs = stages.prepare(smooth_video(), CAPTIONS, generator)
    loss = diffusion_loss(inputs, torch.tensor([100, 900]), torch.randn(inputs.latents.shape, generator=generator))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    proj = diffusion_loss.dit.mixins["patch_embed"].proj.weight.grad  # Conv2d [D, 32, p, p]
    assert proj[:, 16:].abs().sum() > 0  # the image-condition channels learn
    assert list(diffusion_loss.state_dict())[0].startswith("model.diffusion_model.")  # SAT's prefix


def test_v_loss_is_mse_against_the_velocity(t5_folder):
    cfg = tiny_config("cogvideox_2b")
    diffusion_loss = DiffusionLoss(build_dit(cfg), NoiseSchedule(3.0))
    stages = frozen_stages(cfg, t5_folder)
    inputs = stages.prepare(smooth_video(), CAPTIONS, torch.Generator().manual_seed(0))
    noise, t = torch.randn(inputs.latents.shape), torch.tensor([3, 700])
    target = diffusion_loss.schedule.velocity(inputs.latents, noise, t)
    prediction = diffusion_loss.dit(diffusion_loss.schedule.add_noise(inputs.latents, noise, t), t, inputs.text)
    assert_close_rel(diffusion_loss(inputs, t, noise), ((prediction - target) ** 2).mean(dim=(1, 2, 3, 4)))


def test_cogvideox15_i2v_pads_odd_latent_frames_and_feeds_ofs(t5_folder):
    cfg = tiny_config("cogvideox1.5_5b_i2v", "model.dit.num_frames=9")
    stages = frozen_stages(cfg, t5_folder, image_dropout=0.0)
    video = smooth_video(frames=9)
    inputs = stages.prepare(video, CAPTIONS, torch.Generator().manual_seed(0))
    # 9 frames -> 3 latent frames, padded in front to 4 (patch_size_t 2) by repeating the first, as SAT
    assert inputs.latents.shape[1] == 4 and torch.equal(inputs.latents[:, 0], inputs.latents[:, 1])
    assert torch.count_nonzero(inputs.image_latents[:, 1:]) == 0 and inputs.image_latents[:, 0].abs().sum() > 0
    diffusion_loss = DiffusionLoss(build_dit(cfg), NoiseSchedule(1.0), ofs=2.0)
    assert diffusion_loss.ofs == 2.0
    loss = diffusion_loss(inputs, torch.tensor([10, 990]), torch.randn(inputs.latents.shape))
    assert torch.isfinite(loss).all()


def test_frozen_stages_reject_odd_channel_counts(t5_folder):
    cfg = tiny_config("cogvideox_2b")
    dit_config = dataclasses.replace(DiTConfig.from_config(cfg), in_channels=20)
    with pytest.raises(ValueError, match="in_channels"):
        TrainingInputBuilder(dit_config, DiffusionConfig(), FrozenStages())


def test_unknown_first_stage_type_is_a_config_error():
    from sat_video.common.errors import ConfigError
    from sat_video.model.build import build_first_stage

    expected = "model.first_stage.type: expected one of \\['patch_pca', 'video_vae'\\], found 'vqgan'"
    with pytest.raises(ConfigError, match=expected):  # when the config is loaded
        tiny_config("cogvideox_2b", "model.first_stage.type=vqgan")
    with pytest.raises(ConfigError, match=expected):  # and by the builder, for a section made in code
        build_first_stage(FirstStageConfig(type="vqgan"))
