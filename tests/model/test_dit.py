"""The DiT as a whole: forward and backward for every variant, input checks, activation checkpointing, compile."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sat_video
from tests.conftest import VARIANTS, randomize_, tiny_config, tiny_inputs
from tests.numerics import assert_close_rel, assert_identical


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_reaches_every_parameter(variant):
    cfg = tiny_config(variant)
    torch.manual_seed(0)
    model = randomize_(sat_video.build_dit(cfg))
    x, t, context, ofs = tiny_inputs(cfg)
    out = model(x, t, context, ofs=ofs)
    assert out.shape == (2, 4, 16, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_scalar_timesteps_broadcast_and_input_errors_are_explained():
    cfg = tiny_config("cogvideox1.5_5b_i2v")
    model = sat_video.build_dit(cfg)
    x, t, context, ofs = tiny_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(x, 500, context, ofs=2.0), model(x, torch.tensor([500, 500]), context, ofs=ofs))
    with pytest.raises(ValueError, match="pass ofs"):
        model(x, t, context)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[B=2, L, 32\]"):
        model(x, t, context[:1], ofs=ofs)
    with pytest.raises(ValueError, match=r"must be divisible by patch sizes 2x2x2"):
        model(x[:, :3], t, context, ofs=ofs)
    with pytest.raises(ValueError, match=r"x must be \[B, T, C, H, W\]"):
        model(x[0], t, context, ofs=ofs)


def test_one_token_grid_rule_from_pixel_or_latent_frames():
    dit_config = sat_video.DiTConfig.from_config(tiny_config("cogvideox1.5_5b"))  # 2-frame tubes, 2x2 patches
    assert dit_config.latent_frames_of(9) == 3 and dit_config.latent_frames == 4  # 13 frames in tiny.yaml
    assert dit_config.token_grid(9, 8, 6) == sat_video.TokenGrid(2, 4, 3)  # 3 latent frames and a padding frame
    assert dit_config.latent_token_grid(4, 8, 6) == dit_config.token_grid(13, 8, 6) == sat_video.TokenGrid(2, 4, 3)


class _CountAttentionKernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.forward_kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.forward_kernels += 1
        return func(*args, **(kwargs or {}))


def _step(model, inputs, checkpointing, keeps_attention=True):
    model.zero_grad()
    model.activation_checkpointing, model.checkpoint_keeps_attention = checkpointing, keeps_attention
    x, t, context, ofs = inputs
    out = model(x, t, context, ofs=ofs)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _counted_step(model, inputs, checkpointing, keeps_attention=True):
    with _CountAttentionKernels() as counter:
        out, grads = _step(model, inputs, checkpointing, keeps_attention)
    return out, grads, counter.forward_kernels


@pytest.mark.parametrize("variant", ["cogvideox_2b", "cogvideox1.5_5b_i2v"])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_attention_outputs(variant):
    cfg = tiny_config(variant)
    torch.manual_seed(0)
    model = randomize_(sat_video.build_dit(cfg))
    inputs = tiny_inputs(cfg)
    layers = cfg.model.dit.num_layers
    out, grads, kernels = _counted_step(model, inputs, checkpointing=False)
    assert kernels == layers
    for keeps_attention, recomputed in ((True, 0), (False, layers)):
        out_ckpt, grads_ckpt, kernels = _counted_step(model, inputs, checkpointing=True, keeps_attention=keeps_attention)
        assert kernels == layers + recomputed, f"keeps_attention={keeps_attention}"
        assert_identical(out_ckpt, out, "output")
        assert grads_ckpt.keys() == grads.keys()
        for name in grads:  # backward through a recomputed forward accumulates in another order
            assert_close_rel(grads_ckpt[name], grads[name], what=name)


@pytest.mark.slow
def test_compiled_blocks_match_eager_with_and_without_checkpointing():
    from torch._dynamo.utils import counters

    counters.clear()
    cfg = tiny_config("cogvideox_5b")
    torch.manual_seed(0)
    model = randomize_(sat_video.build_dit(cfg))
    compiled = copy.deepcopy(model)
    compiled.compile_blocks()
    inputs = tiny_inputs(cfg)
    out, grads = _step(model, inputs, checkpointing=False)
    for checkpointing in (False, True):
        out_compiled, grads_compiled = _step(compiled, inputs, checkpointing=checkpointing)
        # fused kernels round differently, through every layer
        assert_close_rel(out_compiled, out, rtol=1e-4, what="output")
        for name in grads:
            assert_close_rel(grads_compiled[name], grads[name], rtol=1e-4, what=name)
    assert all(layer._compiled_call_impl is not None for layer in compiled.transformer.layers)
    assert counters["stats"]["unique_graphs"] >= cfg.model.dit.num_layers
    assert not counters["graph_break"], f"graph breaks split the compiled blocks: {list(counters['graph_break'])}"
