"""An ablation mixin written here, outside the package, replaces RoPE by a learned 3D table through config alone."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import sat_video
from sat_video import ConfigError, Mixin, register_mixin
from tests.conftest import tiny_config, tiny_inputs


@register_mixin("test_learned_pos_3d")
class LearnedPos3D(Mixin):
    """A learned [T, H, W, D] position table added to the video tokens (sliced for smaller grids)."""

    @dataclass
    class Config:
        init_std: float = 0.02

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        t, h, w = (
            dit_config.latent_frames,
            dit_config.latent_height // dit_config.patch_size,
            dit_config.latent_width // dit_config.patch_size,
        )
        self.table = nn.Parameter(torch.randn(t, h, w, dit_config.hidden_size) * self.config.init_std)

    def add_position(self, hidden, ctx):
        g = ctx.grid
        table = self.table[: g.frames, : g.height, : g.width].reshape(1, g.num_tokens, -1)
        return torch.cat([hidden[:, : ctx.num_condition_tokens], hidden[:, ctx.num_condition_tokens :] + table], dim=1)


def _cfg():
    return sat_video.load_config(
        [
            tiny_config("cogvideox_5b"),
            {
                "model": {
                    "dit": {
                        "mixin_modules": ["tests.model.test_custom_mixin"],
                        "mixins": {"pos_embed": None, "learned_pos": {"type": "test_learned_pos_3d", "init_std": 0.5}},
                    }
                }
            },
        ]
    )


def test_builds_from_config_and_trains_a_step():
    cfg = _cfg()
    torch.manual_seed(0)
    model = sat_video.build_dit(cfg)
    assert list(model.mixins) == ["patch_embed", "adaln_layer", "final_layer", "learned_pos"]
    assert model.hook_origins["add_position"] == ["learned_pos"]
    assert model.hook_origins["process_qkv"] == ["adaln_layer"]  # RoPE is gone
    assert "mixins.learned_pos.table" in model.state_dict()
    x, t, context, _ = tiny_inputs(cfg)
    target = torch.randn_like(x[:, :, :16])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(model(x, t, context), target)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert model.mixins.learned_pos.table.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]


def test_the_table_changes_the_output_and_works_for_smaller_grids():
    cfg = _cfg()
    model = sat_video.build_dit(cfg)
    x, t, context, _ = tiny_inputs(cfg, frames=2, height=4, width=6)
    with torch.no_grad():
        before = model(x, t, context)
        model.mixins.learned_pos.table.zero_()
        assert not torch.allclose(before, model(x, t, context))


def test_a_dotted_path_inside_an_allowed_module_works():
    cfg = sat_video.load_config(
        [
            tiny_config("cogvideox_5b"),
            {
                "model": {
                    "dit": {
                        "mixin_modules": ["tests"],
                        "mixins": {"pos_embed": {"type": "tests.model.test_custom_mixin.LearnedPos3D"}},
                    }
                }
            },
        ]
    )
    assert isinstance(sat_video.build_dit(cfg).mixins.pos_embed, LearnedPos3D)


def test_unlisted_modules_are_not_imported():
    with pytest.raises(ConfigError, match="mixin_modules"):
        sat_video.load_config(
            [
                tiny_config("cogvideox_5b"),
                {"model": {"dit": {"mixins": {"pos_embed": {"type": "tests.model.test_custom_mixin.LearnedPos3D"}}}}},
            ]
        )
