"""Configs: merging, overrides, and clear errors for unknown keys, types and sizes."""

import dataclasses
import re
import subprocess
import sys
import typing

import pytest
from omegaconf import OmegaConf

import sat_video
from sat_video import ConfigError
from sat_video.config.schema import Config
from tests.conftest import ROOT, VARIANTS, tiny_config


def test_shipped_configs_load_with_published_sizes():
    sizes = {
        "cogvideox_2b": (1920, 30, 30, 16, None, 226, 3.0),
        "cogvideox_5b": (3072, 42, 48, 16, None, 226, 1.0),
        "cogvideox_5b_i2v": (3072, 42, 48, 32, None, 226, 1.0),
        "cogvideox1.5_5b": (3072, 42, 48, 16, 2, 224, 1.0),
        "cogvideox1.5_5b_i2v": (3072, 42, 48, 32, 2, 224, 1.0),
    }
    for variant in VARIANTS:
        cfg = sat_video.load_config(ROOT / "configs" / f"{variant}.yaml")
        d = cfg.model.dit
        got = (d.hidden_size, d.num_layers, d.num_attention_heads, d.in_channels, d.patch_size_t, d.text_length,
               cfg.model.diffusion.snr_shift_scale)
        assert got == sizes[variant], variant
    assert sat_video.load_config(ROOT / "configs" / "cogvideox1.5_5b_i2v.yaml").model.dit.ofs_embed_dim == 512


def test_variants_differ_only_in_configuration():
    """The same mixin names and types build every model; only parameters differ."""
    names = {v: list(sat_video.load_config(ROOT / "configs" / f"{v}.yaml").model.dit.mixins) for v in VARIANTS}
    assert len({tuple(n) for n in names.values()}) == 1


def test_later_files_and_overrides_win():
    cfg = tiny_config("cogvideox_5b", "model.dit.num_layers=3")
    assert cfg.model.dit.hidden_size == 64 and cfg.model.dit.num_layers == 3
    # interpolation follows the final value: the tiny overlay shrinks the ofs embedding with time_embed_dim
    assert tiny_config("cogvideox1.5_5b_i2v").model.dit.ofs_embed_dim == 32


def test_override_typo_names_the_key_and_the_closest_one():
    with pytest.raises(ConfigError) as err:
        tiny_config("cogvideox_2b", "model.dit.hiden_size=64")
    assert "model.dit.hiden_size" in str(err.value) and "hidden_size" in str(err.value.args[0].split("did you mean")[1])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dit:\n    num_layer: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.dit.num_layer'; did you mean 'num_layers'"):
        sat_video.load_config([ROOT / "configs" / "cogvideox_2b.yaml", bad])


def test_unknown_top_level_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'; did you mean 'model'"):
        sat_video.load_config(bad)


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="num_layers"):
        tiny_config("cogvideox_2b", "model.dit.num_layers=many")


def test_mixin_parameters_are_validated_against_the_mixin_config():
    with pytest.raises(ConfigError, match=r"model.dit.mixins.pos_embed.thetta.*did you mean 'theta'"):
        tiny_config("cogvideox_5b", "model.dit.mixins.pos_embed.thetta=5")
    with pytest.raises(ConfigError, match=r"unknown mixin type 'rotary3d'; did you mean 'rotary_3d'"):
        tiny_config("cogvideox_5b", "model.dit.mixins.pos_embed.type=rotary3d")


def test_a_dotted_type_outside_the_allowed_modules_is_refused():
    with pytest.raises(ConfigError, match="mixin_modules"):
        tiny_config("cogvideox_5b", "model.dit.mixins.pos_embed.type=os.path.join")


def test_an_unimportable_mixin_module_is_a_config_error():
    with pytest.raises(ConfigError, match="model.dit.mixin_modules lists 'no_such_ablations', which cannot be imported"):
        tiny_config("cogvideox_5b", "model.dit.mixin_modules=[no_such_ablations]")


def test_a_users_mixins_folder_shadowing_the_builtin_ones_is_named(tmp_path):
    (tmp_path / "mixins").mkdir()
    (tmp_path / "mixins" / "__init__.py").write_text("")
    code = f"import sat_video; sat_video.load_config([{str(ROOT / 'configs' / 'cogvideox_5b.yaml')!r}])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"'import mixins' found {tmp_path / 'mixins'}, not sat_video's built-in mixins" in proc.stderr, proc.stderr[-2000:]


def test_null_removes_an_inherited_mixin():
    cfg = tiny_config("cogvideox_5b", "model.dit.mixins.pos_embed=null")
    assert list(cfg.model.dit.mixins) == ["patch_embed", "adaln_layer", "final_layer"]
    assert "pos_embed" not in sat_video.build_dit(cfg).mixins


def test_inconsistent_sizes_are_explained():
    with pytest.raises(ConfigError, match=r"hidden_size \(65\) must be divisible by num_attention_heads"):
        tiny_config("cogvideox_2b", "model.dit.hidden_size=65")
    with pytest.raises(ConfigError, match="ofs_embed_dim .* must equal time_embed_dim"):
        tiny_config("cogvideox1.5_5b_i2v", "model.dit.ofs_embed_dim=16")


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        sat_video.load_config("nope.yaml")


def test_mixins_that_are_not_a_mapping_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"command-line override: model.dit.mixins: expected a mapping .* found int 3"):
        tiny_config("cogvideox_5b", "model.dit.mixins=3")


# ---------------------------------------------------------------- values checked at load
def _constrained_keys(schema, prefix=""):
    """``(dotted key, type, constraint)`` of every constrained field under ``schema``."""
    hints = typing.get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[spec.name]):
            yield from _constrained_keys(hints[spec.name], f"{prefix}{spec.name}.")
        elif spec.metadata:
            kind = next(t for t in (*typing.get_args(hints[spec.name]), hints[spec.name]) if t in (int, float, str))
            yield f"{prefix}{spec.name}", kind, dict(spec.metadata)


def _refused_value(kind, constraint):
    if "one_of" in constraint:
        first = constraint["one_of"][0]
        return first + "x" if kind is str else max(constraint["one_of"]) + 1
    if "between" in constraint:
        return kind(constraint["between"][1] + 1)
    if "each_one_of" in constraint:
        return [constraint["each_one_of"][0], constraint["each_one_of"][0] + "x"]
    low, exclusive = constraint["at_least"]
    return kind(low) if exclusive else kind(low - 1)


CONSTRAINED = list(_constrained_keys(Config))


def test_the_constrained_keys_include_the_enum_like_and_size_keys():
    keys = {key for key, _, _ in CONSTRAINED}
    assert {"deepspeed.precision", "deepspeed.zero_stage", "train.lr_schedule.decay_style", "sample.scheduler",
            "model.dit.hidden_size", "train.train_iters", "train.save_interval", "data.num_workers"} <= keys
    assert len(keys) >= 50


@pytest.mark.parametrize("key,kind,constraint", CONSTRAINED, ids=[key for key, _, _ in CONSTRAINED])
def test_every_constrained_key_is_refused_at_load_naming_file_key_and_allowed_values(key, kind, constraint, tmp_path):
    value = _refused_value(kind, constraint)
    layer = tmp_path / "bad.yaml"
    node = value
    for part in reversed(key.split(".")):
        node = {part: node}
    layer.write_text(OmegaConf.to_yaml(OmegaConf.create(node)))
    with pytest.raises(ConfigError) as caught:
        sat_video.load_config([ROOT / "configs" / "cogvideox_5b.yaml", ROOT / "configs" / "tiny.yaml", layer])
    message = str(caught.value)
    refused = value[-1] if isinstance(value, list) else value  # a list names its refused item
    assert message.startswith(f"{layer}: {key}: expected ") and repr(refused) in message, message
    if "one_of" in constraint:
        assert ", ".join(map(repr, constraint["one_of"])) in message
        if kind is str:
            assert f"did you mean '{constraint['one_of'][0]}'?" in message


@pytest.mark.parametrize("key,value,expected", [
    ("model.first_stage.type", "vae", "model.first_stage.type: expected one of ['patch_pca', 'video_vae'], found 'vae'; "
                                      "did you mean 'video_vae'?"),
    ("model.text_encoder.type", "t4", "model.text_encoder.type: expected one of ['t5'], found 't4'; did you mean 't5'?"),
    ("model.dit.mixins.pos_embed.type", "rotary3d", "unknown mixin type 'rotary3d'; did you mean 'rotary_3d'?"),
    ("model.dit.num_frames", "12", "num_frames must be 1 + 4k (1, 5, 9, ..., 49), found 12"),
    ("model.dit.in_channels", "20", "in_channels (20) must equal out_channels (16) for text-to-video or twice it"),
    ("model.dit.hidden_size", "72", "head dim 24 is not a multiple of 16"),  # a mixin's own check, at load
    ("train.validation.interval", "5", "train.validation.interval is set but train.validation.prompts is empty"),
    ("train.optimizer.lr", "0.0", "train.optimizer.lr: expected a value > 0, found 0.0"),
])
def test_types_and_rules_across_keys_are_checked_at_load(key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        extra = ["model.dit.num_attention_heads=3"] if key.endswith("hidden_size") else []
        tiny_config("cogvideox_5b", f"{key}={value}", *extra)
