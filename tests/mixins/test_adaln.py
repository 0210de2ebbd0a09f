import torch

import sat_video
from tests.conftest import tiny_config, tiny_inputs


def test_blocks_are_the_identity_at_initialisation():
    """Zero-initialised modulations gate every residual branch to zero."""
    cfg = tiny_config("cogvideox_5b")
    model = sat_video.build_dit(cfg)
    x, t, context, _ = tiny_inputs(cfg)
    seen = {}
    model.transformer.final_layernorm.register_forward_hook(lambda module, args, out: seen.setdefault("stack", args[0]))
    with torch.no_grad():
        model(x, t, context)
        embedded = model.mixins.patch_embed.embed(x, context, None)  # RoPE adds nothing to the tokens
    assert torch.equal(seen["stack"], embedded)


def test_state_dict_layout_and_optional_qk_layernorm():
    model = sat_video.build_dit(tiny_config("cogvideox_5b"))
    adaln = model.mixins.adaln_layer.state_dict()
    assert adaln["adaLN_modulations.0.1.weight"].shape == (12 * 64, 32)
    assert adaln["query_layernorm_list.1.weight"].shape == (32,) and "key_layernorm_list.1.bias" in adaln
    plain = sat_video.build_dit(tiny_config("cogvideox_5b", "model.dit.mixins.adaln_layer.qk_layernorm=false"))
    assert not any("layernorm_list" in k for k in plain.state_dict())
    assert plain.hook_origins["process_qkv"] == ["pos_embed"]


def test_text_and_video_are_gated_separately():
    cfg = tiny_config("cogvideox_5b")
    model = sat_video.build_dit(cfg)
    adaln, layer, n = model.mixins.adaln_layer, model.transformer.layers[0], 8
    hidden = torch.randn(2, n + 64, 64)
    ctx = sat_video.ForwardContext(
        temb=torch.randn(2, 32), num_condition_tokens=n, grid=sat_video.TokenGrid(4, 4, 4), hooks=model._hooks
    )
    bias = adaln.adaLN_modulations[0][1].bias
    with torch.no_grad():
        assert torch.equal(adaln.layer_forward(layer, hidden, ctx, 0), hidden)  # all gates zero
        bias[8 * 64 : 9 * 64] = 1.0  # text attention gate (chunk 8)
        out = adaln.layer_forward(layer, hidden, ctx, 0)
        assert torch.equal(out[:, n:], hidden[:, n:]) and not torch.equal(out[:, :n], hidden[:, :n])
        bias.zero_()
        bias[2 * 64 : 3 * 64] = 1.0  # video attention gate (chunk 2)
        out = adaln.layer_forward(layer, hidden, ctx, 0)
        assert torch.equal(out[:, :n], hidden[:, :n]) and not torch.equal(out[:, n:], hidden[:, n:])
