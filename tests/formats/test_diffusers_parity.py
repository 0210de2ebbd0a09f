"""Numerical parity with diffusers' CogVideoXTransformer3DModel loaded from our export, the rotary embedding handed to
it, and parameter counts."""

import dataclasses

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

import sat_video
from sat_video.common.errors import ConversionError
from sat_video.formats.diffusers_format import diffusers_rotary_embedding, to_diffusers_config
from sat_video.model.config import DiTConfig
from sat_video.model.hooks import Mixin
from tests.conftest import ROOT, VARIANTS, randomize_, tiny_config, tiny_inputs
from tests.numerics import assert_close_rel, assert_identical
from tools.convert_to_diffusers import main as convert_to_diffusers


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every tiny variant with random weights, saved as a SAT checkpoint and exported by the CLI."""
    models = {}
    for index, variant in enumerate(VARIANTS):
        folder = tmp_path_factory.mktemp(variant)
        torch.manual_seed(index)
        model = randomize_(sat_video.build_dit(tiny_config(variant)), seed=index).eval()
        sat_video.save_checkpoint(model, folder / "sat", 100)
        base = [str(ROOT / "configs" / f"{variant}.yaml"), str(ROOT / "configs" / "tiny.yaml")]
        assert convert_to_diffusers(["--base", *base, "--ckpt", str(folder / "sat"), "--out", str(folder / "hf")]) == 0
        hf = CogVideoXTransformer3DModel.from_pretrained(folder / "hf" / "transformer").eval()
        models[variant] = (model, hf)
    return models


SIZES = [("native", 4, None, None), ("other grid", 2, 12, 6)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("label,frames,height,width", SIZES, ids=[s[0] for s in SIZES])
def test_forward_matches_diffusers(exported, variant, label, frames, height, width):
    cfg = tiny_config(variant)
    if label != "native" and cfg.model.dit.mixins.pos_embed.get("learned_table"):
        pytest.skip("the 5B-I2V learned position table exists only for the training grid")
    model, hf = exported[variant]
    x, t, context, ofs = tiny_inputs(cfg, frames=frames, height=height, width=width)
    with torch.no_grad():
        ours = model(x, t, context, ofs=ofs)
        rope = diffusers_rotary_embedding(DiTConfig.from_config(cfg), x.shape[1], *x.shape[3:])
        theirs = hf(x, context, t, ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]
    diff = (ours - theirs).abs().max().item()
    print(f"{variant} {label} {tuple(x.shape)}: max |sat_video - diffusers| = {diff:.2e} (output max {ours.abs().max():.2f})")
    assert ours.shape == theirs.shape == (*x.shape[:2], cfg.model.dit.out_channels, *x.shape[3:])
    assert_close_rel(theirs, ours)


class ShiftedPositions(Mixin):
    """Positions diffusers does not have (named by its dotted path below)."""

    def add_position(self, hidden: torch.Tensor, ctx) -> torch.Tensor:
        return hidden + 1.0


def test_the_rotary_embedding_takes_any_mixin_that_leaves_positions_alone():
    plain = DiTConfig.from_config(tiny_config("cogvideox_5b"))
    expected = diffusers_rotary_embedding(plain, 4, 8, 8)
    for extra in ({"type": "lora", "rank": 4}, {"type": "factorized_attention"}, {"type": "condition_tokens"}):
        dit = dataclasses.replace(plain, mixins={**plain.mixins, "extra": extra})
        for ours, theirs in zip(diffusers_rotary_embedding(dit, 4, 8, 8), expected):
            assert_identical(ours, theirs, extra["type"])
    assert diffusers_rotary_embedding(DiTConfig.from_config(tiny_config("cogvideox_2b")), 4, 8, 8) is None  # sin-cos

    shifted = dataclasses.replace(plain, mixins={**plain.mixins, "shift": {"type": f"{__name__}.ShiftedPositions"}},
                                  mixin_modules=[__name__])
    with pytest.raises(ConversionError, match=r"adaln_layer \(adaln\), pos_embed \(rotary_3d\), shift \(.*ShiftedPositions\)"
                                              r"\. Unsupported: shift$"):
        diffusers_rotary_embedding(shifted, 4, 8, 8)
    both = dataclasses.replace(plain, mixins={**plain.mixins, "sincos": {"type": "sincos_interpolated"}})
    with pytest.raises(ConversionError, match=r"pos_embed \(rotary_3d\), sincos \(sincos_interpolated\)$"):
        diffusers_rotary_embedding(both, 4, 8, 8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_size_parameter_counts_match_diffusers(variant):
    cfg = sat_video.load_config(ROOT / "configs" / f"{variant}.yaml")
    with torch.device("meta"):
        ours = sat_video.build_dit(cfg)
        theirs = CogVideoXTransformer3DModel(**to_diffusers_config(DiTConfig.from_config(cfg)))
    ours_params = sum(p.numel() for p in ours.parameters())
    theirs_params = sum(p.numel() for p in theirs.parameters())
    # diffusers keeps the 5B-I2V learned table as a persistent buffer; in SAT (and here) it is a parameter
    ours_state = sum(v.numel() for v in ours.state_dict().values())
    theirs_state = sum(v.numel() for v in theirs.state_dict().values())
    print(f"{variant}: sat_video {ours_params:,} parameters / {ours_state:,} state entries; "
          f"diffusers {theirs_params:,} parameters / {theirs_state:,} state entries")
    assert ours_state == theirs_state
    if not cfg.model.dit.mixins.pos_embed.get("learned_table"):
        assert ours_params == theirs_params
