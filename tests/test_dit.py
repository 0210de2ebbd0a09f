"""The DiT as a whole: forward and backward for every variant, input checks."""

import pytest
import torch

import sat_video

from .conftest import VARIANTS, randomize_, tiny_config, tiny_inputs


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
    with pytest.raises(ValueError, match=r"context must be \[B=2, L, 32\]"):
        model(x, t, context[:1], ofs=ofs)
    with pytest.raises(ValueError, match=r"must be divisible by patch sizes 2x2x2"):
        model(x[:, :3], t, context, ofs=ofs)
    with pytest.raises(ValueError, match=r"x must be \[B, T, C, H, W\]"):
        model(x[0], t, context, ofs=ofs)
