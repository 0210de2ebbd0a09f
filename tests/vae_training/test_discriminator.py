"""The VAE's 3D discriminator: CogVideo's state-dict names and shapes, its logits, loading from a SAT VAE checkpoint."""

from __future__ import annotations

import pytest
import torch

from sat_video.common.errors import CheckpointError
from sat_video.vae_training.discriminator import VideoDiscriminator, _Blur, discriminator_from_state_dict
from tests.numerics import assert_close_rel, assert_identical

# Discriminator3DWithfirstframe(dim=1, image_size=64, frame_num=9, max_dim=16): widths 4, 8, 16, then 32 and 64 capped
# at 16; int(log2(9)) = 3 video blocks, then int(log2(64)) - 2 = 4 halvings in all, so one 2-D block that halves and a
# last one that does not; the logits Linear sees 64 / 2**4 = 4 x 4 x 16 features.
FIRST_FRAME = dict(dim=1, image_size=64, frame_num=9, max_dim=16)
FIRST_FRAME_KEYS = [
    ("blocks.0.downsample_res.conv.weight", (4, 3, 3, 3)), ("blocks.0.downsample_res.conv.bias", (4,)),
    ("blocks.0.net.0.conv.weight", (4, 3, 3, 3, 3)), ("blocks.0.net.0.conv.bias", (4,)),
    ("blocks.0.net.2.conv.weight", (4, 4, 3, 3, 3)), ("blocks.0.net.2.conv.bias", (4,)),
    ("blocks.0.downsample.conv.weight", (4, 4, 3, 3)), ("blocks.0.downsample.conv.bias", (4,)),
    ("blocks.1.downsample_res.conv.weight", (8, 4, 3, 3)), ("blocks.1.downsample_res.conv.bias", (8,)),
    ("blocks.1.net.0.conv.weight", (8, 4, 3, 3, 3)), ("blocks.1.net.0.conv.bias", (8,)),
    ("blocks.1.net.2.conv.weight", (8, 8, 3, 3, 3)), ("blocks.1.net.2.conv.bias", (8,)),
    ("blocks.1.downsample.conv.weight", (8, 8, 3, 3)), ("blocks.1.downsample.conv.bias", (8,)),
    ("blocks.2.downsample_res.conv.weight", (16, 8, 3, 3)), ("blocks.2.downsample_res.conv.bias", (16,)),
    ("blocks.2.net.0.conv.weight", (16, 8, 3, 3, 3)), ("blocks.2.net.0.conv.bias", (16,)),
    ("blocks.2.net.2.conv.weight", (16, 16, 3, 3, 3)), ("blocks.2.net.2.conv.bias", (16,)),
    ("blocks.2.downsample.conv.weight", (16, 16, 3, 3)), ("blocks.2.downsample.conv.bias", (16,)),
    ("blocks.3.0.conv_res.weight", (16, 16, 1, 1)), ("blocks.3.0.conv_res.bias", (16,)),
    ("blocks.3.0.net.0.weight", (16, 16, 3, 3)), ("blocks.3.0.net.0.bias", (16,)),
    ("blocks.3.0.net.2.weight", (16, 16, 3, 3)), ("blocks.3.0.net.2.bias", (16,)),
    ("blocks.3.0.downsample.1.weight", (16, 64, 1, 1)), ("blocks.3.0.downsample.1.bias", (16,)),
    # Residual(LinearSpaceAttention): 16 heads x 8 dims, no biases
    ("blocks.3.1.0.fn.norm.gamma", (16,)), ("blocks.3.1.0.fn.attn.to_q.0.weight", (128, 16)),
    ("blocks.3.1.0.fn.attn.to_kv.0.weight", (256, 16)), ("blocks.3.1.0.fn.attn.to_out.0.weight", (16, 128)),
    # Residual(FeedForward(mult=4, images=True)): inner int(16 * 4 * 2 / 3) = 42, GEGLU halves 84
    ("blocks.3.1.1.fn.norm.gamma", (16, 1, 1)), ("blocks.3.1.1.fn.net.0.weight", (84, 16, 1, 1)),
    ("blocks.3.1.1.fn.net.0.bias", (84,)), ("blocks.3.1.1.fn.net.2.weight", (16, 42, 1, 1)),
    ("blocks.3.1.1.fn.net.2.bias", (16,)),
    ("blocks.4.0.conv_res.weight", (16, 16, 1, 1)), ("blocks.4.0.conv_res.bias", (16,)),
    ("blocks.4.0.net.0.weight", (16, 16, 3, 3)), ("blocks.4.0.net.0.bias", (16,)),
    ("blocks.4.0.net.2.weight", (16, 16, 3, 3)), ("blocks.4.0.net.2.bias", (16,)),
    ("blocks.4.1.0.fn.norm.gamma", (16,)), ("blocks.4.1.0.fn.attn.to_q.0.weight", (128, 16)),
    ("blocks.4.1.0.fn.attn.to_kv.0.weight", (256, 16)), ("blocks.4.1.0.fn.attn.to_out.0.weight", (16, 128)),
    ("blocks.4.1.1.fn.norm.gamma", (16, 1, 1)), ("blocks.4.1.1.fn.net.0.weight", (84, 16, 1, 1)),
    ("blocks.4.1.1.fn.net.0.bias", (84,)), ("blocks.4.1.1.fn.net.2.weight", (16, 42, 1, 1)),
    ("blocks.4.1.1.fn.net.2.bias", (16,)),
    ("to_logits.0.weight", (16, 16, 3, 3)), ("to_logits.0.bias", (16,)),
    ("to_logits.3.weight", (1, 256)), ("to_logits.3.bias", (1,)),
]

# Discriminator3D(dim=1, image_size=64, frame_num=16, max_dim=16, antialiased_downsample=True): int(log2(16)) = 4 video
# blocks (space-to-depth of 2 x 2 x 2, so 8 x the channels into downsample.1), then the last 2-D block; every block,
# the last too, carries the blur's persistent buffer.
PLAIN = dict(dim=1, image_size=64, frame_num=16, max_dim=16, antialiased_downsample=True, first_frame=False)
PLAIN_KEYS = [
    ("blocks.0.conv_res.weight", (4, 3, 1, 1, 1)), ("blocks.0.conv_res.bias", (4,)),
    ("blocks.0.net.0.weight", (4, 3, 3, 3, 3)), ("blocks.0.net.0.bias", (4,)),
    ("blocks.0.net.2.weight", (4, 4, 3, 3, 3)), ("blocks.0.net.2.bias", (4,)),
    ("blocks.0.maybe_blur.f", (3,)),
    ("blocks.0.downsample.1.weight", (4, 32, 1, 1, 1)), ("blocks.0.downsample.1.bias", (4,)),
    ("blocks.1.conv_res.weight", (8, 4, 1, 1, 1)), ("blocks.1.conv_res.bias", (8,)),
    ("blocks.1.net.0.weight", (8, 4, 3, 3, 3)), ("blocks.1.net.0.bias", (8,)),
    ("blocks.1.net.2.weight", (8, 8, 3, 3, 3)), ("blocks.1.net.2.bias", (8,)),
    ("blocks.1.maybe_blur.f", (3,)),
    ("blocks.1.downsample.1.weight", (8, 64, 1, 1, 1)), ("blocks.1.downsample.1.bias", (8,)),
    ("blocks.2.conv_res.weight", (16, 8, 1, 1, 1)), ("blocks.2.conv_res.bias", (16,)),
    ("blocks.2.net.0.weight", (16, 8, 3, 3, 3)), ("blocks.2.net.0.bias", (16,)),
    ("blocks.2.net.2.weight", (16, 16, 3, 3, 3)), ("blocks.2.net.2.bias", (16,)),
    ("blocks.2.maybe_blur.f", (3,)),
    ("blocks.2.downsample.1.weight", (16, 128, 1, 1, 1)), ("blocks.2.downsample.1.bias", (16,)),
    ("blocks.3.conv_res.weight", (16, 16, 1, 1, 1)), ("blocks.3.conv_res.bias", (16,)),
    ("blocks.3.net.0.weight", (16, 16, 3, 3, 3)), ("blocks.3.net.0.bias", (16,)),
    ("blocks.3.net.2.weight", (16, 16, 3, 3, 3)), ("blocks.3.net.2.bias", (16,)),
    ("blocks.3.maybe_blur.f", (3,)),
    ("blocks.3.downsample.1.weight", (16, 128, 1, 1, 1)), ("blocks.3.downsample.1.bias", (16,)),
    ("blocks.4.0.conv_res.weight", (16, 16, 1, 1)), ("blocks.4.0.conv_res.bias", (16,)),
    ("blocks.4.0.net.0.weight", (16, 16, 3, 3)), ("blocks.4.0.net.0.bias", (16,)),
    ("blocks.4.0.net.2.weight", (16, 16, 3, 3)), ("blocks.4.0.net.2.bias", (16,)),
    ("blocks.4.0.maybe_blur.f", (3,)),
    ("blocks.4.1.0.fn.norm.gamma", (16,)), ("blocks.4.1.0.fn.attn.to_q.0.weight", (128, 16)),
    ("blocks.4.1.0.fn.attn.to_kv.0.weight", (256, 16)), ("blocks.4.1.0.fn.attn.to_out.0.weight", (16, 128)),
    ("blocks.4.1.1.fn.norm.gamma", (16, 1, 1)), ("blocks.4.1.1.fn.net.0.weight", (84, 16, 1, 1)),
    ("blocks.4.1.1.fn.net.0.bias", (84,)), ("blocks.4.1.1.fn.net.2.weight", (16, 42, 1, 1)),
    ("blocks.4.1.1.fn.net.2.bias", (16,)),
    ("to_logits.0.weight", (16, 16, 3, 3)), ("to_logits.0.bias", (16,)),
    ("to_logits.3.weight", (1, 256)), ("to_logits.3.bias", (1,)),
]

# small non-square configurations: 2 attention heads of 4 dims keep the 2-D blocks cheap
NON_SQUARE = dict(dim=1, image_size=(32, 48), frame_num=5, max_dim=8, linear_attn_heads=2, linear_attn_dim_head=4)
PLAIN_NON_SQUARE = dict(dim=1, image_size=(32, 64), frame_num=4, max_dim=8, linear_attn_heads=2, linear_attn_dim_head=4,
                        first_frame=False)


def _seeded(seed: int = 0, **kwargs) -> VideoDiscriminator:
    torch.manual_seed(seed)
    return VideoDiscriminator(**kwargs)


def _clip(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("kwargs, expected", [(FIRST_FRAME, FIRST_FRAME_KEYS), (PLAIN, PLAIN_KEYS)], ids=["first_frame", "plain"])
def test_state_dict_has_cogvideos_names_and_shapes(kwargs, expected):
    found = [(key, tuple(value.shape)) for key, value in VideoDiscriminator(**kwargs).state_dict().items()]
    assert found == expected


@pytest.mark.parametrize("kwargs, shape, logits", [
    (FIRST_FRAME, (2, 3, 17, 64, 64), (2,)),
    (FIRST_FRAME, (1, 3, 1, 64, 64), (1,)),  # a single image: the first frame is never pooled away
    (NON_SQUARE, (2, 3, 5, 32, 48), (2,)),
    (NON_SQUARE, (1, 3, 13, 32, 48), (1,)),
    (PLAIN_NON_SQUARE, (2, 3, 4, 32, 64), (2,)),
    (PLAIN_NON_SQUARE, (2, 3, 8, 32, 64), (4,)),  # two frames left after the video blocks: one logit each
], ids=["ff-17", "ff-1", "ff-nonsquare-5", "ff-nonsquare-13", "plain-4", "plain-8"])
def test_forward_shapes(kwargs, shape, logits):
    with torch.no_grad():
        assert VideoDiscriminator(**kwargs)(_clip(*shape)).shape == logits


# Logits of CogVideo's own classes (sat/sgm/modules/autoencoding/losses/video_loss.py at 34dd614, kornia 0.7.3,
# taylor-series-linear-attention 0.1.10, torch 2.13 CPU) built after torch.manual_seed(0) and fed torch.rand(shape) * 2 - 1
# drawn next: the same values here mean the same modules in the same order (so the same initial weights) and the same
# forward. rtol 1e-4: two dozen float32 layers, whose sums other CPUs and thread counts order differently.
@pytest.mark.parametrize("kwargs, shape, reference", [
    (NON_SQUARE, (2, 3, 9, 32, 48), [0.155285448, 0.154995441]),
    (PLAIN_NON_SQUARE, (2, 3, 8, 32, 64), [-0.0318667144, -0.0267387703, -0.0308280177, -0.028978467]),
], ids=["first_frame", "plain"])
def test_seeded_logits_match_cogvideos(kwargs, shape, reference):
    model = _seeded(0, **kwargs)
    with torch.no_grad():
        logits = model(torch.rand(shape) * 2 - 1)
    assert_close_rel(logits, torch.tensor(reference), rtol=1e-4, what="logits")


def test_blur_is_a_normalised_binomial_with_replicated_borders():
    impulse = torch.zeros(1, 2, 3, 5, 5)
    impulse[:, :, :, 2, 2] = 16
    binomial = torch.tensor([1.0, 2.0, 1.0])
    assert_identical(_Blur()(impulse)[0, 0, 0, 1:4, 1:4], torch.outer(binomial, binomial), "impulse response")
    constant = torch.full((1, 2, 4, 4), 0.75)
    assert_identical(_Blur()(constant), constant, "constant image (borders replicated, weights summing to 1)")


@pytest.mark.parametrize("kwargs, shape", [
    (dict(NON_SQUARE, antialiased_downsample=True), (1, 3, 9, 32, 48)),
    (dict(PLAIN_NON_SQUARE, antialiased_downsample=True), (1, 3, 8, 32, 64)),
], ids=["first_frame", "plain"])
def test_backward_reaches_every_parameter_and_every_frame(kwargs, shape):
    model = _seeded(0, **kwargs)
    video = _clip(*shape).requires_grad_()
    model(video).sum().backward()
    unreached = [name for name, parameter in model.named_parameters()
                 if parameter.grad is None or not parameter.grad.abs().sum() > 0]
    assert not unreached
    frame_grads = video.grad.abs().sum(dim=(0, 1, 3, 4))
    assert (frame_grads > 0).all(), f"frames that do not reach the logits: {(frame_grads == 0).nonzero().flatten().tolist()}"


def _sat_vae_state(discriminator: VideoDiscriminator, prefix: str) -> dict[str, torch.Tensor]:
    """A SAT VAE checkpoint's state dict: the autoencoder, the loss's LPIPS network and the discriminator."""
    return {"encoder.conv_in.conv.weight": torch.ones(8, 3, 3, 3, 3), "decoder.conv_out.conv.bias": torch.zeros(3),
            "loss.perceptual_model.net.slice1.0.weight": torch.ones(64, 3, 3, 3),
            **{prefix + key: value for key, value in discriminator.state_dict().items()}}


@pytest.mark.parametrize("prefix", ["loss.discr_3d.", "discr_3d."])
def test_loads_from_a_sat_vae_state_dict(prefix):
    trained = _seeded(1, **NON_SQUARE)
    loaded = discriminator_from_state_dict(_sat_vae_state(trained, prefix), **NON_SQUARE)
    video = _clip(2, 3, 9, 32, 48)
    with torch.no_grad():
        assert_identical(loaded(video), trained(video), "logits after loading")


def test_no_discriminator_in_the_state_gives_none():
    state = {"encoder.conv_in.conv.weight": torch.ones(1), "loss.perceptual_model.lin0.model.1.weight": torch.ones(1),
             "loss.discr.to_logits.3.weight": torch.ones(1)}  # the 2-D discriminator's prefix is not the 3D one's
    assert discriminator_from_state_dict(state, **NON_SQUARE) is None


def test_keys_that_do_not_fit_are_named():
    state = _sat_vae_state(_seeded(0, **NON_SQUARE), "loss.discr_3d.")
    del state["loss.discr_3d.blocks.2.0.conv_res.bias"]
    state["loss.discr_3d.blocks.9.net.0.weight"] = torch.ones(1)
    state["loss.discr_3d.to_logits.3.weight"] = torch.ones(1, 48)
    with pytest.raises(CheckpointError) as caught:
        discriminator_from_state_dict(state, **NON_SQUARE)
    message = str(caught.value)
    assert "1 missing: loss.discr_3d.blocks.2.0.conv_res.bias" in message
    assert "1 unexpected: loss.discr_3d.blocks.9.net.0.weight" in message
    assert "loss.discr_3d.to_logits.3.weight (expected (1, 192), found (1, 48))" in message  # 8 x 32/8 x 48/8
    assert "image_size=(32, 48)" in message and "frame_num=5" in message


def test_other_constructor_arguments_are_refused_with_the_keys():
    state = _sat_vae_state(_seeded(0, **dict(NON_SQUARE, max_dim=16)), "discr_3d.")
    with pytest.raises(CheckpointError, match=r"of another shape: discr_3d\.blocks\.2\.0\.conv_res\.weight "
                                              r"\(expected \(8, 8, 1, 1\), found \(16, 8, 1, 1\)\)"):
        discriminator_from_state_dict(state, **NON_SQUARE)


def test_both_prefixes_at_once_are_refused():
    model = _seeded(0, **NON_SQUARE)
    state = {**_sat_vae_state(model, "loss.discr_3d."), **_sat_vae_state(model, "discr_3d.")}
    with pytest.raises(CheckpointError, match="both 'loss.discr_3d.' and 'discr_3d.'"):
        discriminator_from_state_dict(state, **NON_SQUARE)


@pytest.mark.parametrize("kwargs, message", [
    # 4 video blocks halve 32 to 2, but the reference's logits Linear is sized for 32 / 2**3 = 4
    (dict(dim=4, image_size=32, frame_num=17), r"4 video blocks .* room for 3 halvings .* at least 64 or frame_num below 16"),
    (dict(dim=4, image_size=32, frame_num=16, first_frame=False), r"4 video blocks .* room for 3 halvings"),
    (dict(dim=1, image_size=64, frame_num=1), "frame_num must be at least 2"),
    (dict(dim=1, image_size=(36, 64), frame_num=4, first_frame=False), "image height 36 does not halve evenly the 3 times"),
    (dict(dim=1, image_size=(64, 0), frame_num=4), r"image_size must be a positive int or \(height, width\)"),
    (dict(dim=0, image_size=64, frame_num=4), "dim must be a positive int"),
], ids=["too-many-halvings", "plain-too-many-halvings", "one-frame", "odd-size", "zero-size", "zero-dim"])
def test_unusable_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VideoDiscriminator(**kwargs)


@pytest.mark.parametrize("kwargs, shape, message", [
    (NON_SQUARE, (1, 3, 5, 48, 32), "built for 32x48 clips .* got 48x32"),
    (NON_SQUARE, (1, 3, 7, 32, 48), r"takes 1 \+ 4k frames \(1, 5, 9, \.\.\.\), got 7"),
    (NON_SQUARE, (1, 1, 5, 32, 48), r"takes video \[B, 3, T, H, W\], got shape \(1, 1, 5, 32, 48\)"),
    (NON_SQUARE, (3, 5, 32, 48), r"got shape \(3, 5, 32, 48\)"),
    (PLAIN_NON_SQUARE, (1, 3, 6, 32, 64), "a multiple of 4 frames, got 6"),
    # int(log2(49)) = 5 halvings: the reference would drop frames 33 to 48 on the way
    (dict(dim=1, image_size=128, frame_num=49, max_dim=4), (1, 3, 49, 128, 128), r"1 \+ 32k frames"),
], ids=["size", "frames", "channels", "rank", "plain-frames", "49-of-49"])
def test_clips_it_cannot_take_are_refused(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        VideoDiscriminator(**kwargs)(torch.zeros(shape))


def test_construction_is_deterministic_under_the_seed():
    first, again, other = (_seeded(seed, **NON_SQUARE).state_dict() for seed in (0, 0, 1))
    for key in first:
        assert_identical(again[key], first[key], key)
    assert not torch.equal(other["to_logits.3.weight"], first["to_logits.3.weight"])
