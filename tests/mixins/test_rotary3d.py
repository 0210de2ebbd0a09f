import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed

import sat_video
from mixins.rotary3d import Rotary3DMixin, rotate_half
from sat_video import TokenGrid
from sat_video.model.config import DiTConfig
from tests.conftest import tiny_config
from tests.numerics import assert_close_rel


def test_cos_sin_match_diffusers_integer_positions():
    dit_config = DiTConfig.from_config(tiny_config("cogvideox_5b"))
    mixin = Rotary3DMixin(dit_config)
    for grid in [TokenGrid(4, 4, 4), TokenGrid(3, 6, 2)]:
        cos, sin = mixin.cos_sin(grid, torch.device("cpu"), torch.float32)
        hf_cos, hf_sin = get_3d_rotary_pos_embed(dit_config.head_dim, None, (grid.height, grid.width), grid.frames,
                                                 grid_type="slice", max_size=(grid.height, grid.width))
        assert_close_rel(cos, hf_cos)
        assert_close_rel(sin, hf_sin)


def test_rotation_of_video_tokens_only_matches_diffusers():
    dit_config = DiTConfig.from_config(tiny_config("cogvideox_5b"))
    mixin, grid, n = Rotary3DMixin(dit_config), TokenGrid(2, 3, 4), 5
    q, k, v = (torch.randn(2, dit_config.num_attention_heads, n + grid.num_tokens, dit_config.head_dim) for _ in range(3))
    ctx = sat_video.ForwardContext(temb=torch.zeros(2, 32), num_condition_tokens=n, grid=grid, hooks=None)
    q2, k2, v2 = mixin.process_qkv(q, k, v, ctx, 0)
    freqs = mixin.cos_sin(grid, q.device, q.dtype)
    assert torch.equal(q2[:, :, :n], q[:, :, :n]) and v2 is v
    assert_close_rel(q2[:, :, n:], apply_rotary_emb(q[:, :, n:], freqs))
    assert_close_rel(k2[:, :, n:], apply_rotary_emb(k[:, :, n:], freqs))
    assert torch.equal(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-2.0, 1.0, -4.0, 3.0]))


def test_learned_table_is_zero_initialised_and_refuses_other_grids():
    cfg = tiny_config("cogvideox_5b_i2v")
    model = sat_video.build_dit(cfg)
    table = model.mixins.pos_embed.pos_embedding
    assert table.shape == (1, 8 + 4 * 4 * 4, 64) and table.abs().sum() == 0
    x = torch.randn(1, 2, 32, 8, 8)  # fewer frames: the table's prefix
    model(x, torch.tensor([1]), torch.randn(1, 8, 32))
    with pytest.raises(ValueError, match="learned position table covers 8 text tokens and a 4x4x4 grid"):
        model(torch.randn(1, 2, 32, 12, 8), torch.tensor([1]), torch.randn(1, 8, 32))


def test_learned_table_covers_the_training_clip_with_its_padding_frames():
    # 9 frames -> 3 latent frames, padded to 4 for 2-frame tubes: a 2x4x4 grid (flooring would give 1x4x4 and
    # refuse the model's own training clip)
    cfg = tiny_config("cogvideox1.5_5b_i2v", "model.dit.num_frames=9", "model.dit.mixins.pos_embed.learned_table=true")
    model = sat_video.build_dit(cfg)
    assert model.mixins.pos_embed.train_grid == TokenGrid(2, 4, 4)
    out = model(torch.randn(1, 4, 32, 8, 8), torch.tensor([1]), torch.randn(1, 8, 32), ofs=2.0)
    assert out.shape == (1, 4, 16, 8, 8)
