import pytest
import torch
from diffusers.models.embeddings import CogVideoXPatchEmbed

import sat_video
from sat_video import TokenGrid
from tests.conftest import randomize_, tiny_config
from tests.numerics import assert_close_rel


@pytest.mark.parametrize("variant", ["cogvideox_5b", "cogvideox1.5_5b_i2v"])
def test_patch_embedding_matches_diffusers(variant):
    cfg = tiny_config(variant)
    dit_config = cfg.model.dit
    mixin = randomize_(sat_video.build_dit(cfg)).mixins.patch_embed
    theirs = CogVideoXPatchEmbed(
        dit_config.patch_size,
        dit_config.patch_size_t,
        dit_config.in_channels,
        dit_config.hidden_size,
        dit_config.text_hidden_size,
        use_positional_embeddings=False,
        use_learned_positional_embeddings=False,
    )
    theirs.load_state_dict(mixin.state_dict())
    x, context = torch.randn(2, 4, dit_config.in_channels, 8, 6), torch.randn(2, 8, dit_config.text_hidden_size)
    with torch.no_grad():
        assert_close_rel(mixin.embed(x, context, None), theirs(context, x))


def test_wrong_channels_are_explained():
    cfg = tiny_config("cogvideox_5b_i2v")
    model = sat_video.build_dit(cfg)
    with pytest.raises(ValueError, match="x has 16 channels, the model expects in_channels=32"):
        model(torch.randn(1, 4, 16, 8, 8), torch.tensor([1]), torch.randn(1, 8, 32))
    with pytest.raises(ValueError, match="must be divisible by patch sizes 1x2x2"):
        model(torch.randn(1, 4, 32, 7, 8), torch.tensor([1]), torch.randn(1, 8, 32))


@pytest.mark.parametrize("variant,frames", [("cogvideox_2b", 3), ("cogvideox1.5_5b", 4)])
def test_final_layer_unpatchifies_token_by_token(variant, frames):
    """Token (t, h, w) feature (c, o, p, q) lands at frame t*pt+o, channel c, row h*p+p', column w*p+q."""
    cfg = tiny_config(variant)
    dit_config = cfg.model.dit
    model = sat_video.build_dit(cfg)
    final = model.mixins.final_layer
    pt = dit_config.patch_size_t or 1
    grid = TokenGrid(frames // pt, 3, 2)
    with torch.no_grad():
        final.linear.weight.zero_()
        final.linear.bias.copy_(torch.arange(final.linear.bias.numel(), dtype=torch.float32))
    ctx = sat_video.ForwardContext(temb=torch.zeros(1, 32), num_condition_tokens=8, grid=grid, hooks=None)
    out = final.final_forward(torch.randn(1, 8 + grid.num_tokens, 64), ctx)
    assert out.shape == (1, frames, dit_config.out_channels, 6, 4)
    c, o, p, q = 5, pt - 1, 1, 0
    feature = ((c * pt + o) * 2 + p) * 2 + q
    assert out[0, 1 * pt + o, c, 2 * 2 + p, 1 * 2 + q] == feature
