"""FactorizedAttentionMixin: each arrangement restricts attention as documented, image batches train only spatial
parameters, and every arrangement runs forward and backward on each patch and position layout."""

import pytest
import torch
import torch.nn.functional as F

import sat_video
from mixins.factorized_attention import ARRANGEMENTS, spatial_attention, temporal_attention
from sat_video import ConfigError, ForwardContext, TokenGrid
from tests.conftest import randomize_, tiny_config, tiny_inputs
from tests.numerics import assert_close_rel

TEXT = 8  # tiny.yaml's text_length
GRID = TokenGrid(4, 4, 4)  # tiny.yaml: 4 latent frames of 8x8 latents, 2x2 patches


def _model(arrangement, variant="cogvideox_2b", *overrides):
    cfg = sat_video.load_config(
        [
            tiny_config(variant, *overrides),
            {"model": {"dit": {"mixins": {"st": {"type": "factorized_attention", "arrangement": arrangement}}}}},
        ]
    )
    torch.manual_seed(0)
    return cfg, randomize_(sat_video.build_dit(cfg))  # open the zero-initialised AdaLN gates


def _token(t, h, w):
    return TEXT + (t * GRID.height + h) * GRID.width + w


def _allowed(kind, text_length, grid):
    """The attention pattern the module docstring describes, as a boolean [S, S] mask (True: may attend)."""
    t, h, w = torch.meshgrid(torch.arange(grid.frames), torch.arange(grid.height), torch.arange(grid.width), indexing="ij")
    frame = torch.cat([torch.full((text_length,), -1), t.flatten()])
    position = torch.cat([torch.full((text_length,), -1), (h * grid.width + w).flatten()])
    is_text = frame < 0
    if kind == "spatial":
        video_rows = is_text[None, :] | (frame[:, None] == frame[None, :])
        return torch.where(is_text[:, None], torch.ones_like(video_rows), video_rows)
    video_rows = ~is_text[None, :] & (position[:, None] == position[None, :])
    return torch.where(is_text[:, None], is_text[None, :].expand_as(video_rows), video_rows)


@pytest.mark.parametrize("text_length", [TEXT, 0])
@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_kernels_equal_full_attention_with_the_documented_mask(kind, text_length):
    grid = TokenGrid(3, 2, 4)
    q, k, v = torch.randn(3, 2, 2, text_length + grid.num_tokens, 16).unbind(0)
    kernel = spatial_attention if kind == "spatial" else temporal_attention
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(kind, text_length, grid))
    assert_close_rel(kernel(q, k, v, text_length, grid), reference)


def _layer_output(model, layer_idx, hidden):
    ctx = ForwardContext(
        temb=torch.randn(1, 32, generator=torch.Generator().manual_seed(1)),
        num_condition_tokens=TEXT,
        grid=GRID,
        hooks=model._hooks,
    )
    with torch.no_grad():
        return model.transformer.layers[layer_idx](hidden, ctx, layer_idx)


def _changed_tokens(model, layer_idx, perturbed):
    """Tokens whose output of block ``layer_idx`` changes when the input token ``perturbed`` changes."""
    hidden = torch.randn(1, TEXT + GRID.num_tokens, 64, generator=torch.Generator().manual_seed(0))
    other = hidden.clone()
    other[:, perturbed] += torch.randn(64, generator=torch.Generator().manual_seed(2))  # not a constant: LayerNorm removes those
    difference = (_layer_output(model, layer_idx, hidden) - _layer_output(model, layer_idx, other)).abs().amax(-1)[0]
    return {i for i in range(hidden.shape[1]) if difference[i] > 1e-6}


def test_interleaved_blocks_attend_within_a_frame_then_along_time():
    _, model = _model("interleaved")
    perturbed = _token(1, 0, 0)
    spatial = _changed_tokens(model, 0, perturbed)  # block 0: spatial
    assert spatial == set(range(TEXT)) | {_token(1, h, w) for h in range(4) for w in range(4)}  # the text sees every frame
    temporal = _changed_tokens(model, 1, perturbed)  # block 1: temporal
    assert temporal == {_token(t, 0, 0) for t in range(4)}  # the text sees no video here


def test_sequential_puts_the_spatial_blocks_first():
    _, model = _model("sequential", "cogvideox_2b", "model.dit.num_layers=4")
    mixin = model.mixins.st
    assert [mixin.is_temporal_block(i) for i in range(4)] == [False, False, True, True]
    assert _changed_tokens(model, 1, _token(1, 0, 0)) == set(range(TEXT)) | {_token(1, h, w) for h in range(4) for w in range(4)}
    assert _changed_tokens(model, 2, _token(1, 0, 0)) == {_token(t, 0, 0) for t in range(4)}


def test_serial_block_reaches_everything_in_two_hops_while_parallel_block_does_not():
    perturbed = _token(1, 0, 0)
    same_frame, same_position, neither = _token(1, 2, 3), _token(3, 0, 0), _token(0, 2, 3)
    _, parallel = _model("parallel_in_block")
    changed = _changed_tokens(parallel, 0, perturbed)
    assert {same_frame, same_position} <= changed and neither not in changed
    # serial: temporal attention sees x + spatial output, so frame 1's change reaches (h, w) = (2, 3) of frame 0
    _, serial = _model("serial_in_block")
    assert {same_frame, same_position, neither} <= _changed_tokens(serial, 0, perturbed)


def _temporal_parameters(model):
    mixin = model.mixins.st
    if mixin.config.arrangement in ("serial_in_block", "parallel_in_block"):
        return {name for name, _ in model.named_parameters() if name.startswith("mixins.st.temporal_attention.")}
    layers = [i for i in range(model.dit_config.num_layers) if mixin.is_temporal_block(i)]
    prefixes = [f"transformer.layers.{i}." for i in layers] + [
        f"mixins.adaln_layer.{part}.{i}."
        for i in layers
        for part in ("adaLN_modulations", "query_layernorm_list", "key_layernorm_list")
    ]
    return {name for name, _ in model.named_parameters() if name.startswith(tuple(prefixes))}


def _backward(model, cfg, frames):
    x, t, context, _ = tiny_inputs(cfg, frames=frames)
    model.zero_grad(set_to_none=True)
    out = model(x, t, context)
    out.pow(2).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_image_batches_train_only_spatial_parameters(arrangement):
    cfg, model = _model(arrangement)
    temporal = _temporal_parameters(model)
    assert temporal
    image = _backward(model, cfg, frames=1)
    for name in temporal:
        assert image[name] is None or not image[name].any(), name
    assert any(image[name] is not None and image[name].any() for name in image if name not in temporal)
    video = _backward(model, cfg, frames=4)
    for name in temporal:
        if "weight" in name and video[name].ndim == 2:
            assert video[name].any(), name


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_temporal_parts_are_the_identity_for_images_only(arrangement):
    cfg, model = _model(arrangement)
    neutral = _model(arrangement)[1]
    with torch.no_grad():  # the same weights, with the temporal parts switched off
        mixin = neutral.mixins.st
        if arrangement in ("serial_in_block", "parallel_in_block"):
            for param in mixin.temporal_attention.parameters():
                param.zero_()
        else:
            for i in range(model.dit_config.num_layers):
                if mixin.is_temporal_block(i):
                    neutral.mixins.adaln_layer.adaLN_modulations[i][1].weight.zero_()  # zero gates: the block is
                    neutral.mixins.adaln_layer.adaLN_modulations[i][1].bias.zero_()  # the identity
        x, t, context, _ = tiny_inputs(cfg)
        assert torch.equal(model(x[:, :1], t, context), neutral(x[:, :1], t, context))
        assert not torch.allclose(model(x, t, context), neutral(x, t, context))


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_forward_and_backward_with_frame_patches_tubes_sincos_and_rope(arrangement):
    for variant in ("cogvideox_2b", "cogvideox_5b", "cogvideox1.5_5b"):  # sin-cos / RoPE / RoPE with 2x2x2 tubes
        cfg, model = _model(arrangement, variant)
        x, t, context, _ = tiny_inputs(cfg)
        out = model(x, t, context)
        assert out.shape == x.shape
        out.pow(2).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_serial_and_parallel_own_one_temporal_attention_per_block():
    _, model = _model("parallel_in_block")
    keys = model.mixins.st.state_dict()
    assert keys["temporal_attention.1.query_key_value.weight"].shape == (192, 64)
    assert keys["temporal_attention.1.dense.weight"].shape == (64, 64)
    assert model.hook_origins["attention_forward"] == ["st"] and model.hook_origins["attention_kernel"] == ["default"]
    _, blocks = _model("interleaved")
    assert not blocks.mixins.st.state_dict()  # (1) and (2) only restrict the existing attention
    assert blocks.hook_origins["layer_forward"] == ["adaln_layer", "st"] and blocks.hook_origins["attention_kernel"] == ["st"]


def test_temporal_attention_linears_go_through_the_project_hook():
    from sat_video.model.hooks import Mixin, wraps_previous

    class Names(Mixin):
        def __init__(self, dit_config):
            super().__init__(dit_config)
            self.seen = set()

        @wraps_previous
        def project(self, linear, x, ctx, layer_idx, name, *, inner):
            self.seen.add(name)
            return inner(linear, x, ctx, layer_idx, name)

    cfg, model = _model("serial_in_block")
    names = Names(model.dit_config)
    model.add_mixin("names", names)
    with torch.no_grad():
        model(*tiny_inputs(cfg)[:3])
    assert {"temporal_attention.query_key_value", "temporal_attention.dense"} <= names.seen


def test_bad_settings_are_refused_clearly():
    with pytest.raises(
        ConfigError, match="must be one of interleaved, sequential, serial_in_block, parallel_in_block, found 'diagonal'"
    ):
        _model("diagonal")
    with pytest.raises(ConfigError, match="needs at least one spatial and one temporal block.*num_layers is 1"):
        _model("sequential", "cogvideox_2b", "model.dit.num_layers=1")
    with pytest.raises(ConfigError, match="arangement"):
        sat_video.load_config(
            [
                tiny_config("cogvideox_2b"),
                {"model": {"dit": {"mixins": {"st": {"type": "factorized_attention", "arangement": "x"}}}}},
            ]
        )
