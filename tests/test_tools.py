"""The command-line tools: export, import, refusal on mismatch, I2V widening."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from safetensors.torch import load_file

import sat_video
from sat_video.formats.sat_checkpoint import SAT_PREFIX
from tests.conftest import ROOT, randomize_, tiny_config, tiny_inputs
from tests.formats.test_sat_checkpoint import _sat_lora_state
from tests.numerics import assert_close_rel, assert_identical
from tools.convert_from_diffusers import main as convert_from_diffusers
from tools.convert_to_diffusers import main as convert_to_diffusers
from tools.widen_to_i2v import main as widen_to_i2v


def _base(variant):
    return [str(ROOT / "configs" / f"{variant}.yaml"), str(ROOT / "configs" / "tiny.yaml")]


def _saved(tmp_path, variant="cogvideox_5b", seed=0):
    torch.manual_seed(seed)
    model = randomize_(sat_video.build_dit(tiny_config(variant)), seed=seed)
    sat_video.save_checkpoint(model, tmp_path / f"{variant}-sat", 1)
    return model, tmp_path / f"{variant}-sat"


@pytest.mark.slow
def test_cli_export_writes_a_loadable_transformer_and_the_matching_scheduler(tmp_path):
    _, ckpt = _saved(tmp_path, "cogvideox_2b")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_to_diffusers.py"),
            "--base",
            *_base("cogvideox_2b"),
            "--ckpt",
            str(ckpt),
            "--out",
            str(tmp_path / "hf"),
            "--dtype",
            "bf16",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    hf = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "hf" / "transformer", torch_dtype=torch.bfloat16)
    assert hf.dtype == torch.bfloat16 and not hf.config.use_rotary_positional_embeddings
    stored = load_file(str(tmp_path / "hf" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    assert hf.config.spatial_interpolation_scale == 1.875
    scheduler = CogVideoXDDIMScheduler.from_pretrained(tmp_path / "hf" / "scheduler")
    assert scheduler.config.snr_shift_scale == 3.0 and scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"


def test_export_refuses_when_config_and_checkpoint_disagree(tmp_path, capsys):
    _, ckpt = _saved(tmp_path)
    code = convert_to_diffusers(
        ["--base", *_base("cogvideox_5b"), "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "model.dit.num_layers=3"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "missing keys" in err and "transformer.layers.2.attention.query_key_value.weight" in err
    assert not (tmp_path / "hf").exists()


def test_export_never_writes_into_an_existing_folder(tmp_path, capsys):
    _, ckpt = _saved(tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    assert convert_to_diffusers(["--base", *_base("cogvideox_5b"), "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["mine.txt"]


def test_export_merges_sat_lora(tmp_path):
    model, _ = _saved(tmp_path)
    state = _sat_lora_state(model, 4, torch.Generator().manual_seed(3))
    torch.save({"module": {SAT_PREFIX + k: v for k, v in state.items()}}, tmp_path / "lora.pt")
    assert (
        convert_to_diffusers(
            ["--base", *_base("cogvideox_5b"), "--ckpt", str(tmp_path / "lora.pt"), "--out", str(tmp_path / "hf")]
        )
        == 0
    )
    merged = sat_video.build_dit(tiny_config("cogvideox_5b"))
    sat_video.load_checkpoint(merged, tmp_path / "lora.pt")
    hf = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "hf" / "transformer")
    qkv = merged.state_dict()["transformer.layers.0.attention.query_key_value.weight"]
    assert torch.equal(hf.transformer_blocks[0].attn1.to_k.weight.detach(), qkv.chunk(3)[1])
    assert not torch.equal(qkv, model.state_dict()["transformer.layers.0.attention.query_key_value.weight"])


@pytest.mark.parametrize("variant", ["cogvideox_2b", "cogvideox_5b_i2v", "cogvideox1.5_5b_i2v"])
def test_diffusers_round_trip_restores_the_weights(tmp_path, variant):
    model, ckpt = _saved(tmp_path, variant)
    assert convert_to_diffusers(["--base", *_base(variant), "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert (
        convert_from_diffusers(["--diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--base", *_base(variant)])
        == 0
    )
    back = sat_video.build_dit(sat_video.load_config(tmp_path / "back" / "config.yaml"))
    sat_video.load_checkpoint(back, tmp_path / "back")
    for key, value in model.state_dict().items():
        if key.startswith("transformer.final_layernorm."):  # the export folds an eps ratio in: x * c / c rounds
            assert_close_rel(back.state_dict()[key], value, what=key)
        else:
            assert_identical(back.state_dict()[key], value, key)


def test_import_refuses_a_base_config_of_another_model(tmp_path, capsys):
    _, ckpt = _saved(tmp_path)
    assert convert_to_diffusers(["--base", *_base("cogvideox_5b"), "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    code = convert_from_diffusers(
        ["--diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--base", *_base("cogvideox_2b")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "describe different models" in err and "mixins" in err
    assert not (tmp_path / "back").exists()


def test_import_reads_sharded_folders(tmp_path):
    model, ckpt = _saved(tmp_path)
    assert convert_to_diffusers(["--base", *_base("cogvideox_5b"), "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "hf" / "transformer")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert convert_from_diffusers(["--diffusers", str(tmp_path / "sharded"), "--out", str(tmp_path / "back")]) == 0
    back = sat_video.build_dit(sat_video.load_config(tmp_path / "back" / "config.yaml"))
    sat_video.load_checkpoint(back, tmp_path / "back")
    assert json.loads((tmp_path / "hf" / "transformer" / "config.json").read_text())["num_layers"] == 2


@pytest.mark.parametrize("variant", ["cogvideox_2b", "cogvideox1.5_5b"])
def test_widened_t2v_checkpoint_reproduces_t2v_with_zero_image_channels(tmp_path, variant):
    model, ckpt = _saved(tmp_path, variant)
    assert widen_to_i2v(["--base", *_base(variant), "--ckpt", str(ckpt), "--out", str(tmp_path / "i2v")]) == 0
    cfg = sat_video.load_config(tmp_path / "i2v" / "config.yaml")
    assert cfg.model.dit.in_channels == 32
    widened = sat_video.build_dit(cfg)
    sat_video.load_checkpoint(widened, tmp_path / "i2v")
    x, t, context, _ = tiny_inputs(tiny_config(variant))
    image = torch.zeros_like(x)
    with torch.no_grad():
        # zero image channels add zero terms, but the patch sums run over more channels
        assert_close_rel(widened(torch.cat([x, image], dim=2), t, context), model(x, t, context))
    proj = widened.mixins.patch_embed.proj.weight
    assert proj.shape[1] == (32 if variant == "cogvideox_2b" else 32 * 8) and proj.abs().sum() > 0


def test_widening_to_the_5b_i2v_layout_lists_the_fresh_learned_table(tmp_path, capsys):
    _, ckpt = _saved(tmp_path, "cogvideox_5b")
    assert (
        widen_to_i2v(
            [
                "--base",
                *_base("cogvideox_5b"),
                "--ckpt",
                str(ckpt),
                "--out",
                str(tmp_path / "i2v"),
                "model.dit.mixins.pos_embed.learned_table=true",
            ]
        )
        == 0
    )
    assert "initialised fresh (not in the T2V checkpoint): mixins.pos_embed.pos_embedding" in capsys.readouterr().out
    widened = sat_video.build_dit(sat_video.load_config(tmp_path / "i2v" / "config.yaml"))
    sat_video.load_checkpoint(widened, tmp_path / "i2v")
    assert widened.mixins.pos_embed.pos_embedding.abs().sum() == 0


def test_overrides_may_follow_the_base_files_directly(tmp_path, capsys):
    _, ckpt = _saved(tmp_path)
    code = convert_to_diffusers(
        ["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--base", *_base("cogvideox_5b"), "model.dit.num_layers=3"]
    )
    assert code == 2 and "transformer.layers.2." in capsys.readouterr().err  # the override was applied, not read as a file


HELP_SCRIPT = """
import contextlib, io, runpy, sys
import sat_video
for tool in sys.argv[1:]:
    sys.argv = [tool, "--help"]
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        runpy.run_path(tool, run_name="__main__")
    assert "usage:" in out.getvalue(), tool
print(" ".join(sorted(name for name in ("deepspeed", "diffusers", "transformers") if name in sys.modules)))
"""


def test_import_and_every_tools_help_load_none_of_deepspeed_diffusers_transformers():
    tools = sorted(str(path) for path in (ROOT / "tools").glob("*.py"))
    proc = subprocess.run([sys.executable, "-c", HELP_SCRIPT, *tools], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"imported at start-up: {proc.stdout.strip()}"
