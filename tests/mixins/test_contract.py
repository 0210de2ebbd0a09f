"""The contract every registered mixin and frozen stage keeps, for each type the built-in registry holds: output shapes,
a state-dict round trip, identity at init where the class declares it, catalogue hooks that the composition shows,
and ``runs_sharded`` held to what it claims, against sequence parallelism simulated in one process.

A registered type without an entry in ``BUILDS`` (mixins) or ``STAGE_BUILDS`` (frozen stages) fails here: a new
mixin joins the contract when it joins the registry.
"""

import dataclasses
import functools
import json

import pytest
import torch

import sat_video
from mixins.lora import LORA_TARGETS
from mixins.pca_first_stage import FRAMES_PER_TUBE, PatchBasis, PatchPCAFirstStage
from sat_video.common.errors import HookConflictError
from sat_video.model.build import import_plugins
from sat_video.model.context import SequenceShard
from sat_video.model.hooks import HOOKS, Composition, Mixin, wraps_previous
from sat_video.model.registry import _MIXINS, _STAGES
from sat_video.model.stages import SPATIAL_COMPRESSION, STAGE_HOOKS, FrozenStage
from tests.conftest import randomize_, tiny_config, tiny_inputs
from tests.numerics import assert_close_rel, assert_identical

import_plugins()
MIXIN_TYPES = sorted(name for name, cls in _MIXINS.items() if cls.__module__.startswith("mixins."))
STAGE_TYPES = sorted(name for name, cls in _STAGES.items() if cls.__module__.startswith("mixins."))

ALL_TOKENS = {"adaln_layer": None, "qk_norm": {"type": "qk_layernorm"}, "timestep_token": {"type": "condition_tokens"}}
BUILDS = {
    # type -> the tiny models it is checked in: (model config, model.dit.mixins entries stacked on it)
    "image_patch_embed": [("cogvideox_5b", {}), ("cogvideox1.5_5b_i2v", {})],  # frame patches; tubes
    "adaln": [("cogvideox_5b", {}), ("cogvideox_5b", {"adaln_layer": {"qk_layernorm": False}})],
    "final_layer": [("cogvideox_5b", {}), ("cogvideox1.5_5b_i2v", {})],
    "sincos_interpolated": [("cogvideox_2b", {})],
    "rotary_3d": [("cogvideox_5b", {}), ("cogvideox_5b_i2v", {})],  # RoPE; with the learned table
    "qk_layernorm": [("cogvideox_5b", ALL_TOKENS)],
    "condition_tokens": [("cogvideox_5b", ALL_TOKENS)],
    "lora": [("cogvideox_5b", {"lora": {"type": "lora", "rank": 4, "targets": list(LORA_TARGETS)}})],
    "factorized_attention": [("cogvideox_2b", {"latte": {"type": "factorized_attention", "arrangement": arrangement}})
                             for arrangement in ("interleaved", "serial_in_block")],
}


def _pca_stage(seed: int) -> PatchPCAFirstStage:
    generator = torch.Generator().manual_seed(seed)

    def basis(dim: int) -> PatchBasis:
        directions = torch.linalg.qr(torch.randn(dim, 16, generator=generator)).Q.T.contiguous()  # orthonormal rows
        return PatchBasis(torch.randn(dim, generator=generator), directions, torch.rand(16, generator=generator) + 0.5)

    first = 3 * SPATIAL_COMPRESSION**2
    return PatchPCAFirstStage(basis(first), basis(FRAMES_PER_TUBE * first))


STAGE_BUILDS = {
    # type -> how to build a small one from a seed, or where its instance is checked when building one takes seconds
    "patch_pca": _pca_stage,
    "video_vae": "tests/mixins/test_video_vae.py (a VAE imports diffusers' model code)",
    "t5": "tests/mixins/test_t5_encoder.py (a T5 needs a trained tokenizer)",
}


@functools.cache
def _config(variant: str, mixins: str):
    return sat_video.load_config([tiny_config(variant), {"model": {"dit": {"mixins": json.loads(mixins)}}}])


def _models(type_name: str):
    """``(label, config, randomised model, name of the mixin of type_name)`` per entry of ``BUILDS``, each model new."""
    assert type_name in BUILDS, f"registered mixin type '{type_name}' has no entry in BUILDS ({__file__}): say how to build it"
    for variant, mixins in BUILDS[type_name]:
        cfg = _config(variant, json.dumps(mixins))
        torch.manual_seed(0)
        model = randomize_(sat_video.build_dit(cfg)).eval()
        names = [name for name, mixin in model.mixins.items() if type(mixin) is _MIXINS[type_name]]
        assert len(names) == 1, f"{type_name}: expected one mixin of that type in {variant} + {mixins}, found {names}"
        yield f"{type_name} in {variant} + {mixins}", cfg, model, names[0]


def _forward(model, cfg, **size):
    x, t, context, ofs = tiny_inputs(cfg, **size)
    with torch.no_grad():
        return model(x, t, context, ofs=ofs)


def test_every_registered_type_has_an_entry():
    assert sorted(BUILDS) == MIXIN_TYPES, "BUILDS must list exactly the registered mixin types"
    assert sorted(STAGE_BUILDS) == STAGE_TYPES, "STAGE_BUILDS must list exactly the registered stage types"


@pytest.mark.parametrize("type_name", MIXIN_TYPES)
def test_output_shapes(type_name):
    for label, cfg, model, _ in _models(type_name):
        patch_t = model.dit_config.patch_size_t or 1
        for frames, height, width in ((4, None, None), (2 * patch_t, 12, 6)):
            x = tiny_inputs(cfg, frames=frames, height=height, width=width)[0]
            grid = model.dit_config.latent_token_grid(x.shape[1], *x.shape[3:])
            try:
                for mixin in model.mixins.values():
                    mixin.check_grid(grid, cfg.model.dit.text_length)
            except ValueError:
                continue  # a grid the mixin refuses up front (a learned table's)
            out = _forward(model, cfg, frames=frames, height=height, width=width)
            assert out.shape == (*x.shape[:2], model.dit_config.out_channels, *x.shape[3:]), f"{label} on {grid}"
            assert torch.isfinite(out).all(), f"{label} on {grid}"


@pytest.mark.parametrize("type_name", MIXIN_TYPES)
def test_state_dict_round_trip(type_name, tmp_path):
    for index, (label, cfg, model, name) in enumerate(_models(type_name)):
        sat_video.save_checkpoint(model, tmp_path / str(index), 1)
        torch.manual_seed(1)
        fresh = randomize_(sat_video.build_dit(cfg), seed=1).eval()
        sat_video.load_checkpoint(fresh, tmp_path / str(index))
        mixin_state = {key: value for key, value in fresh.state_dict().items() if key.startswith(f"mixins.{name}.")}
        for key, value in mixin_state.items():
            assert_identical(value, model.state_dict()[key], f"{label}: {key}")
        assert_identical(_forward(fresh, cfg), _forward(model, cfg), label)


@pytest.mark.parametrize("type_name", [name for name in MIXIN_TYPES if _MIXINS[name].identity_at_init])
def test_identity_at_init_where_declared(type_name):
    for label, cfg, model, name in _models(type_name):
        model.mixins[name].reset_parameters()  # randomize_ touched it too
        with_mixin = _forward(model, cfg)
        model.del_mixin(name)
        assert_identical(with_mixin, _forward(model, cfg), label)


@pytest.mark.parametrize("type_name", MIXIN_TYPES)
def test_hooks_are_catalogue_hooks_and_the_composition_shows_them(type_name):
    catalogue = {spec.name: spec for spec in HOOKS}
    for label, _, model, name in _models(type_name):
        mixin = model.mixins[name]
        provided = mixin.implemented_hooks()
        assert provided, f"{label}: provides no hook"
        assert set(provided) <= set(catalogue), f"{label}: {provided} are not all catalogue hooks"
        for hook in provided:
            method = getattr(type(mixin), hook)
            assert method is not getattr(Mixin, hook), f"{label}: lists {hook} without overriding it"
            if getattr(method, "wraps_previous", False):
                assert catalogue[hook].composition is Composition.REPLACE, f"{label}: wraps {hook}, a CHAIN hook"
        shown = [hook for hook, origins in model.hook_origins.items() if name in origins]
        assert shown == provided, label
        described = [line.split()[0] for line in model.describe_hooks().splitlines() if name in line.split()[2:]]
        assert described == provided, label


# ---------------------------------------------------------------------- runs_sharded, against a simulated split


def _rank_rows(whole: torch.Tensor, n: int, shard: SequenceShard, dim: int) -> torch.Tensor:
    """The part of a whole sequence (along ``dim``) that ``shard``'s rank holds: the ``n`` condition tokens, then its
    video tokens, zero padding last."""
    video = shard.take(whole.narrow(dim, n, shard.num_tokens).movedim(dim, 0)).movedim(0, dim)
    return torch.cat([whole.narrow(dim, 0, n), video], dim=dim)


def _with_rank_rows(whole: torch.Tensor, part: torch.Tensor, n: int, shard: SequenceShard, dim: int) -> torch.Tensor:
    """``whole`` with the rows ``shard``'s rank holds taken from its ``part`` (padding dropped)."""
    count = min(shard.size, shard.num_tokens - shard.start)
    whole = whole.clone()
    whole.narrow(dim, 0, n).copy_(part.narrow(dim, 0, n))
    whole.narrow(dim, n + shard.start, count).copy_(part.narrow(dim, n, count))
    return whole


class _Recording(Mixin):
    """On the whole sequence: keeps what every attention kernel receives and the sequence before the output head."""

    def __init__(self, dit_config):
        super().__init__(dit_config)
        self.attention, self.joined = [], None

    @wraps_previous
    def attention_kernel(self, q, k, v, ctx, layer_idx, *, inner):
        self.attention.append((q, k, v))
        return inner(q, k, v, ctx, layer_idx)

    def join_sequence(self, hidden, ctx):
        self.joined = hidden
        return hidden, ctx


class _OneRankOfMany(Mixin):
    """Sequence parallelism in one process, as rank ``rank`` of ``world_size``: this rank's part of the video tokens
    runs through the blocks, and what the other ranks would send (their rows of q, k, v for attention, their rows of
    the sequence at the join) comes from a ``_Recording`` of the whole sequence. As ``mixins/sequence_parallel.py``,
    attention kernels see the whole sequence and the output head the joined one."""

    runs_sharded = True

    def __init__(self, dit_config, rank: int, world_size: int, recording: _Recording):
        super().__init__(dit_config)
        self.rank, self.world_size, self.recording, self.calls = rank, world_size, recording, 0

    def split_sequence(self, hidden, ctx):
        shard = SequenceShard(self.rank, self.world_size, hidden.shape[1] - ctx.num_condition_tokens)
        return _rank_rows(hidden, ctx.num_condition_tokens, shard, dim=1), dataclasses.replace(ctx, shard=shard)

    @wraps_previous
    def attention_kernel(self, q, k, v, ctx, layer_idx, *, inner):
        n, shard = ctx.num_condition_tokens, ctx.shard
        whole = [_with_rank_rows(w, part, n, shard, dim=2) for w, part in zip(self.recording.attention[self.calls], (q, k, v))]
        self.calls += 1
        return _rank_rows(inner(*whole, dataclasses.replace(ctx, shard=None), layer_idx), n, shard, dim=2)

    def join_sequence(self, hidden, ctx):
        whole = _with_rank_rows(self.recording.joined, hidden, ctx.num_condition_tokens, ctx.shard, dim=1)
        return whole, dataclasses.replace(ctx, shard=None)


def _check_split_equals_whole(model, cfg, world_size: int = 3) -> None:
    """Every rank of a ``world_size`` split (3: the last rank holds padding) gives the whole sequence's output."""
    recording = _Recording(model.dit_config)
    model.add_mixin("recording", recording)
    whole = _forward(model, cfg)
    model.del_mixin("recording")
    for rank in range(world_size):
        model.add_mixin("sequence_parallel", _OneRankOfMany(model.dit_config, rank, world_size, recording))
        split = _forward(model, cfg)
        model.del_mixin("sequence_parallel")
        assert_close_rel(split, whole, what=f"rank {rank} of {world_size}")


@pytest.mark.parametrize("type_name", MIXIN_TYPES)
def test_runs_sharded_holds_against_a_simulated_split(type_name):
    """What ``runs_sharded = True`` claims: on any rank's part of the sequence (``ctx.shard`` set) the hooks give the
    rows the whole sequence gives. A mixin that does not claim it is refused by the split, by name."""
    for label, cfg, model, name in _models(type_name):
        if not _MIXINS[type_name].runs_sharded:
            with pytest.raises(HookConflictError, match=f"mixin '{name}'"):
                model.add_mixin("sequence_parallel", _OneRankOfMany(model.dit_config, 0, 3, _Recording(model.dit_config)))
            continue
        try:
            _check_split_equals_whole(model, cfg)
        except AssertionError as err:
            raise AssertionError(f"{label} declares runs_sharded but a split changes its output: {err}") from None


class _RowTable(Mixin):
    """Declares runs_sharded but indexes a per-token table by the rows it holds rather than by ``ctx.shard``."""

    runs_sharded = True

    def process_qkv(self, q, k, v, ctx, layer_idx):
        n = ctx.num_condition_tokens
        table = torch.arange(k.shape[2] - n, dtype=k.dtype)[:, None] / 100
        return q, torch.cat([k[:, :, :n], k[:, :, n:] + table], dim=2), v


def test_the_simulated_split_catches_a_mixin_that_needs_the_whole_grid():
    cfg = tiny_config("cogvideox_5b")
    torch.manual_seed(0)
    model = randomize_(sat_video.build_dit(cfg)).eval()
    model.add_mixin("row_table", _RowTable(model.dit_config))
    with pytest.raises(AssertionError, match="rank 1 of 3"):
        _check_split_equals_whole(model, cfg)


# ---------------------------------------------------------------------- frozen stages


@pytest.mark.parametrize("type_name", STAGE_TYPES)
def test_stage_hooks_are_catalogue_hooks_of_one_role(type_name):
    cls = _STAGES[type_name]
    provided = [spec for spec in STAGE_HOOKS if getattr(cls, spec.name) is not getattr(FrozenStage, spec.name)]
    assert provided, f"{type_name} provides no stage hook"
    roles = {spec.role for spec in provided}
    assert len(roles) == 1, f"{type_name} provides hooks of several roles: {roles}"
    assert {spec.name for spec in provided} == {spec.name for spec in STAGE_HOOKS if spec.role in roles}, (
        f"{type_name} provides only part of its role's hooks")
    assert cls.config_type == type_name and callable(getattr(cls, "from_config", None))


@pytest.mark.parametrize("type_name", [name for name in STAGE_TYPES if callable(STAGE_BUILDS.get(name))])
def test_stage_shapes_frozen_and_state_dict_round_trip(type_name):
    stage = STAGE_BUILDS[type_name](0)
    assert not stage.train().training and not any(p.requires_grad for p in stage.parameters())
    assert "encode_moments" in stage.provided_hooks(), "only first stages have a cheap build here"
    ratio = sat_video.DiTConfig().temporal_compression_ratio
    latent_frames, latent_size = 2, 2
    video = torch.rand(1, 3, 1 + ratio * (latent_frames - 1), latent_size * SPATIAL_COMPRESSION,
                       latent_size * SPATIAL_COMPRESSION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = stage.encode(video)
    assert latents.shape[2:] == (latent_frames, latent_size, latent_size)
    assert stage.decode(latents).shape == video.shape
    fresh = STAGE_BUILDS[type_name](1)
    fresh.load_state_dict(stage.state_dict())
    assert_identical(fresh.encode(video), latents)
