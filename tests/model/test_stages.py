"""The frozen-stage catalogue: stages plug in by type, compose with checked conflicts, and stay frozen."""

import pytest
import torch
from torch import nn

from mixins.pca_first_stage import PatchBasis, PatchPCAFirstStage
from sat_video import FrozenStage, HookConflictError, MissingHookError
from sat_video.model.build import build_frozen_stages
from sat_video.model.stages import FrozenStages
from tests.conftest import tiny_config
from tests.numerics import assert_identical


class _Captions(FrozenStage):
    """A text encoder with a parameter and dropout, to show that both are frozen."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))

    def encode_text(self, captions):
        return self.proj(torch.ones(len(captions), 2, 3))


def _pca(channels=4):
    def basis(dim):
        return PatchBasis(torch.zeros(dim), torch.eye(channels, dim), torch.ones(channels))

    return PatchPCAFirstStage(basis(192), basis(768), scale_factor=0.5)


def test_a_stage_is_frozen_and_stays_in_eval_mode():
    stage = _Captions()
    assert not any(p.requires_grad for p in stage.parameters())
    stage.train()
    assert not stage.training and not stage.proj[1].training
    stage.late = nn.Linear(2, 2)  # attached after construction: frozen too
    assert not stage.late.weight.requires_grad and not stage.late.training
    assert torch.equal(stage.encode_text(["a"]), stage.encode_text(["a"]))  # dropout off


def test_stages_compose_and_describe_who_provides_what():
    stages = FrozenStages().add_stage("first_stage_model", _pca()).add_stage("conditioner", _Captions())
    assert stages.describe_stages().splitlines() == [
        "encode_moments  first stage   first_stage_model (PatchPCAFirstStage)",
        "decode_latents  first stage   first_stage_model (PatchPCAFirstStage)",
        "encode_text     text encoder  conditioner (_Captions)",
    ]
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents = stages.encode(video)
    assert_identical(latents, stages.encode_moments(video)[0] * 0.5)  # the scale factor, written once
    assert stages.decode(latents).shape == video.shape
    assert stages.encode_text(["a", "b"]).shape == (2, 2, 4)


def test_a_second_provider_of_a_hook_is_refused_naming_both_and_nothing_is_added():
    stages = FrozenStages().add_stage("first_stage_model", _pca())
    with pytest.raises(HookConflictError, match=r"stages 'first_stage_model' \(PatchPCAFirstStage\) and 'other' "
                                                r"\(PatchPCAFirstStage\) both provide 'encode_moments'"):
        stages.add_stage("other", _pca())
    assert list(stages.stages) == ["first_stage_model"] and stages.first_stage is stages.stages.first_stage_model


def test_a_missing_stage_is_named_when_it_is_needed():
    with pytest.raises(MissingHookError, match=r"no frozen stage provides 'encode_text'.*text encoder \(model.text_encoder\)"):
        FrozenStages().add_stage("first_stage_model", _pca()).encode_text(["a"])


def test_the_builder_plugs_stages_in_by_config_type(train_assets):
    cfg = tiny_config("cogvideox_2b", f"model.text_encoder.path={train_assets / 't5'}",
                      "model.first_stage.architecture.block_out_channels=[8,8,16,16]",
                      "model.first_stage.architecture.layers_per_block=1", "model.first_stage.architecture.norm_num_groups=4")
    stages = build_frozen_stages(cfg.model)
    assert [type(stage).__name__ for stage in stages.stages.values()] == ["VideoVAEMixin", "T5TextEncoder"]
    assert list(stages.stages) == ["first_stage_model", "conditioner"]  # SAT's names
    assert [type(s).config_type for s in stages.stages.values()] == ["video_vae", "t5"]
    assert list(build_frozen_stages(cfg.model, first_stage=False).stages) == ["conditioner"]
