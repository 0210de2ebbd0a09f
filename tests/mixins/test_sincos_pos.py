import torch
from diffusers.models.embeddings import get_3d_sincos_pos_embed

import sat_video
from mixins.sincos_pos import SinCosInterpolatedPosMixin
from sat_video import TokenGrid
from sat_video.model.config import DiTConfig
from tests.conftest import tiny_config
from tests.numerics import assert_close_rel


def test_table_matches_diffusers_with_interpolation_on_any_grid():
    dit_config = DiTConfig.from_config(tiny_config("cogvideox_2b"))
    mixin = SinCosInterpolatedPosMixin(dit_config, SinCosInterpolatedPosMixin.Config(1.875, 1.875, 1.0))
    for frames, height, width in [(4, 4, 4), (3, 5, 7), (1, 2, 9)]:
        ours = mixin.table(TokenGrid(frames, height, width), torch.device("cpu"), torch.float32)
        theirs = get_3d_sincos_pos_embed(dit_config.hidden_size, (width, height), frames, 1.875, 1.0).flatten(0, 1)
        assert ours.shape == (frames * height * width, dit_config.hidden_size)
        assert_close_rel(ours, theirs.float())


def test_only_video_tokens_move_and_fewer_frames_are_a_prefix():
    cfg = tiny_config("cogvideox_2b")
    model = sat_video.build_dit(cfg)
    mixin, n = model.mixins.pos_embed, cfg.model.dit.text_length
    hidden = torch.zeros(1, n + 4 * 4 * 4, cfg.model.dit.hidden_size)
    grid = TokenGrid(4, 4, 4)
    ctx = sat_video.ForwardContext(temb=torch.zeros(1, 32), num_condition_tokens=n, grid=grid, hooks=model._hooks)
    out = mixin.add_position(hidden, ctx)
    assert torch.equal(out[:, :n], hidden[:, :n]) and out[:, n:].abs().sum() > 0
    short = mixin.table(TokenGrid(2, 4, 4), torch.device("cpu"), torch.float32)
    assert torch.equal(short, out[0, n : n + 32])
    assert mixin.state_dict() == {}  # derived, never stored
