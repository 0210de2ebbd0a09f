"""ConditionTokensMixin ("all tokens" conditioning) and the QKLayerNormMixin that replaces AdaLN's qk-LayerNorm."""

import pytest
import torch

import sat_video
from sat_video.model.build import build_mixin
from sat_video.model.hooks import Mixin, wraps_previous
from tests.conftest import randomize_, tiny_config, tiny_inputs

ALL_TOKENS = {"adaln_layer": None, "qk_norm": {"type": "qk_layernorm"}, "timestep_token": {"type": "condition_tokens"}}


def _model(variant="cogvideox_5b", **extra_mixins):
    cfg = sat_video.load_config([tiny_config(variant), {"model": {"dit": {"mixins": {**ALL_TOKENS, **extra_mixins}}}}])
    torch.manual_seed(0)
    return cfg, randomize_(sat_video.build_dit(cfg))


def test_config_swaps_adaln_for_plain_blocks_a_timestep_token_and_qk_layernorm():
    _, model = _model()
    assert "adaln_layer" not in model.mixins
    origins = model.hook_origins
    assert origins["embed"] == ["patch_embed", "timestep_token"]
    assert origins["layer_forward"] == ["default"]  # plain pre-LN blocks: no modulation
    assert origins["process_qkv"] == ["qk_norm", "pos_embed"]  # qk-LayerNorm before RoPE, as with AdaLN
    assert model.mixins.timestep_token.state_dict()["time_proj.weight"].shape == (64, 32)


class SeenLength(Mixin):
    """Records the condition-token count the output head sees."""

    def __init__(self, dit_config):
        super().__init__(dit_config)
        self.lengths = []

    @wraps_previous
    def final_forward(self, hidden, ctx, *, inner):
        self.lengths.append((ctx.num_condition_tokens, hidden.shape[1]))
        return inner(hidden, ctx)


def test_the_token_is_prepended_and_counted_as_a_condition_token():
    cfg, model = _model()
    seen = SeenLength(model.dit_config)
    model.add_mixin("seen", seen)
    x, t, context, _ = tiny_inputs(cfg)
    with torch.no_grad():
        out = model(x, t, context)
        tokens = model.mixins.patch_embed.embed(x, context, None)
    assert out.shape == x.shape
    assert seen.lengths == [(context.shape[1] + 1, 1 + tokens.shape[1])]


def test_the_timestep_reaches_the_blocks_only_through_the_token():
    cfg, model = _model()
    head = model.mixins.final_layer.adaLN_modulation[1]
    x, _, context, _ = tiny_inputs(cfg)
    early, late = torch.full((2,), 10), torch.full((2,), 900)
    with torch.no_grad():
        head.weight.zero_()  # the output head's own timestep modulation off: only the token carries the timestep
        assert not torch.allclose(model(x, early, context), model(x, late, context))
        model.mixins.timestep_token.time_proj.weight.zero_()  # a token that no longer depends on the timestep
        assert torch.equal(model(x, early, context), model(x, late, context))


def test_trains_with_factorized_attention_and_the_token_reaches_every_frame():
    cfg, model = _model("cogvideox_2b", st={"type": "factorized_attention", "arrangement": "interleaved"})
    x, t, context, _ = tiny_inputs(cfg)
    out = model(x, t, context)
    out.pow(2).mean().backward()
    grad = model.mixins.timestep_token.time_proj.weight.grad
    assert grad is not None and grad.any()
    with torch.no_grad():  # spatial attention: every frame's video tokens see the timestep token
        head = model.mixins.final_layer.adaLN_modulation[1]
        head.weight.zero_()
        a, b = model(x, torch.full((2,), 10), context), model(x, torch.full((2,), 900), context)
        assert ((a - b).flatten(2).abs().amax(-1) > 0).all()  # [B, T]: every frame changed


def test_qk_layernorm_matches_the_adaln_mixins_qk_layernorm():
    cfg = tiny_config("cogvideox_5b")
    model = sat_video.build_dit(cfg)
    adaln = model.mixins.adaln_layer
    standalone = build_mixin(model.dit_config, {"type": "qk_layernorm"})
    randomize_(adaln, seed=3)
    names = [k for k in adaln.state_dict() if "layernorm_list" in k]
    assert sorted(names) == sorted(standalone.state_dict())  # same names: weights move between the two
    standalone.load_state_dict({k: adaln.state_dict()[k] for k in names})
    q, k, v = torch.randn(3, 2, 2, 72, 32).unbind(0)
    for layer_idx in range(model.dit_config.num_layers):
        expected = adaln.process_qkv(q, k, v, None, layer_idx)
        for a, b in zip(standalone.process_qkv(q, k, v, None, layer_idx), expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("order", [["qk_norm", "pos_embed"], ["pos_embed", "qk_norm"]])
def test_qk_layernorm_runs_before_rope_whatever_the_order(order):
    cfg = sat_video.load_config(
        [tiny_config("cogvideox_5b"), {"model": {"dit": {"mixins": {"adaln_layer": None, "pos_embed": None}}}}]
    )
    model = sat_video.build_dit(cfg)
    entries = {"qk_norm": {"type": "qk_layernorm"}, "pos_embed": {"type": "rotary_3d"}}
    for name in order:
        model.add_mixin(name, build_mixin(model.dit_config, entries[name]))
    assert model.hook_origins["process_qkv"] == ["qk_norm", "pos_embed"]
