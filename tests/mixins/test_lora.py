"""LoRAMixin: identity at init, only adapters train, merge = unmerged, diffusers adapter parity, SAT LoRA
checkpoints, clear errors, and a LoRA training run."""

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

import sat_video
from mixins.lora import LoRAAdapter, LoRAMixin
from sat_video import CheckpointError, ConfigError, Mixin
from sat_video.formats.diffusers_format import LORA_WEIGHTS, diffusers_rotary_embedding
from sat_video.formats.sat_checkpoint import SAT_PREFIX, read_state_dict
from sat_video.formats.sat_lora import merge_lora
from sat_video.model.config import DiTConfig
from sat_video.training.optim import select_trainable
from tests.conftest import ROOT, VARIANTS, randomize_, tiny_config, tiny_inputs
from tests.formats.test_sat_checkpoint import _sat_lora_state
from tests.numerics import FLOAT32_RTOL, assert_close_rel, assert_identical
from tests.training.runs import BASE, train_here
from tools.convert_to_diffusers import main as convert_to_diffusers

ALL_TARGETS = "[attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h]"
LORA_YAML = str(ROOT / "configs" / "lora.yaml")


def _base(variant):
    return [str(ROOT / "configs" / f"{variant}.yaml"), str(ROOT / "configs" / "tiny.yaml")]


def _lora_overrides(rank=4, alpha=2.0, targets=ALL_TARGETS, dropout=0.0):
    return [f"model.dit.mixins.lora.{key}={value}" for key, value in
            (("rank", rank), ("alpha", alpha), ("targets", targets), ("dropout", dropout))]


def _lora_config(variant, **kwargs):
    return sat_video.load_config([*_base(variant), LORA_YAML], _lora_overrides(**kwargs))


def _trained_lora_model(variant, seed=0, **kwargs):
    """A LoRA model with random base weights and adapters as after training (B non-zero, so that LoRA changes the
    output by about 1e-2, a thousand times the parity tolerance)."""
    torch.manual_seed(seed)
    model = randomize_(sat_video.build_dit(_lora_config(variant, **kwargs)), seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".matrix_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def _without_lora(variant, lora_model):
    """The same model without the mixin, adapters merged into the base weights."""
    plain = sat_video.build_dit(tiny_config(variant))
    plain.load_state_dict(merge_lora(lora_model.state_dict(), "lora", lora_model.mixins.lora.scale))
    return plain.eval()


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _assert_changed(changed, unchanged):
    """The adapter was applied, not silently dropped: a change far past float32 rounding."""
    assert _max_diff(changed, unchanged) > 100 * FLOAT32_RTOL * unchanged.abs().max().item()


# ---------------------------------------------------------------------- the mixin


def test_layout_mirrors_sat_and_leaves_base_keys_alone():
    model = sat_video.build_dit(_lora_config("cogvideox_5b", rank=4, targets="[attention.query_key_value, attention.dense]"))
    state = model.state_dict()
    plain_keys = set(sat_video.build_dit(tiny_config("cogvideox_5b")).state_dict())
    lora_keys = {k for k in state if k.startswith("mixins.lora.")}
    assert set(state) - lora_keys == plain_keys
    width = model.dit_config.hidden_size
    for i in range(model.dit_config.num_layers):
        for p in range(3):
            assert state[f"mixins.lora.layers.{i}.attention.query_key_value.matrix_A.{p}"].shape == (4, width)
            assert state[f"mixins.lora.layers.{i}.attention.query_key_value.matrix_B.{p}"].shape == (width, 4)
        assert state[f"mixins.lora.layers.{i}.attention.dense.matrix_A.0"].shape == (4, width)
        assert state[f"mixins.lora.layers.{i}.attention.dense.matrix_B.0"].shape == (width, 4)
    assert len(lora_keys) == model.dit_config.num_layers * (6 + 2)
    assert model.hook_origins["project"] == ["default", "lora"]


def test_at_init_the_model_is_unchanged():
    cfg = _lora_config("cogvideox_5b")
    torch.manual_seed(0)
    model = randomize_(sat_video.build_dit(cfg))
    model.mixins.lora.reset_parameters()  # randomize_ touched the adapters too; back to A random, B zero
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".matrix_A." in n)
    plain = sat_video.build_dit(tiny_config("cogvideox_5b"))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mixins.lora.")})
    x, t, context, _ = tiny_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(x, t, context), plain(x, t, context))


def test_adapter_update_is_sats_formula():
    adapter = LoRAAdapter(8, 12, 3, 2)
    with torch.no_grad():
        for lora_b in adapter.matrix_B:
            lora_b.normal_()
    x = torch.randn(5, 8)
    expected = torch.cat([x @ a.T @ b.T for a, b in zip(adapter.matrix_A, adapter.matrix_B)], dim=-1) * 0.25
    assert_close_rel(adapter(x, 0.25), expected)


def test_one_optimizer_step_changes_only_lora_parameters():
    cfg = _lora_config("cogvideox_5b")
    torch.manual_seed(0)
    model = randomize_(sat_video.build_dit(cfg))
    model.mixins.lora.reset_parameters()
    trainable = select_trainable(model, list(cfg.train.trainable))  # configs/lora.yaml's pattern
    assert set(trainable) == {n for n, _ in model.named_parameters() if n.startswith("mixins.lora.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    x, t, context, _ = tiny_inputs(cfg)
    for step in range(2):  # B is zero at init, so A's gradient is zero until B has moved once
        optimizer.zero_grad()
        model(x, t, context).square().mean().backward()
        if step == 0:
            assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)


def test_wraps_a_replaced_projection():
    class Doubled(Mixin):
        def project(self, linear, x, ctx, layer_idx, name):
            return 2.0 * linear(x)

    model = _trained_lora_model("cogvideox_5b")
    lora = model.del_mixin("lora")
    model.add_mixin("doubled", Doubled(model.dit_config))
    model.add_mixin("lora", lora)
    assert model.hook_origins["project"] == ["doubled", "lora"]
    layer = model.transformer.layers[1]
    x = torch.randn(2, 5, model.dit_config.hidden_size)
    with torch.no_grad():
        out = model._hooks.project(layer.attention.dense, x, None, 1, "attention.dense")
        expected = 2.0 * layer.attention.dense(x) + lora.layers[1]["attention"]["dense"](x, lora.scale)
        untouched = model._hooks.project(layer.attention.dense, x, None, 1, "temporal_attention.dense")
    assert_close_rel(out, expected)
    assert lora.layers[1]["attention"]["dense"](x, lora.scale).abs().max() > 1e-2
    assert torch.equal(untouched, 2.0 * layer.attention.dense(x))  # not a LoRA target: passed through


def test_dropout_acts_in_training_only():
    model = _trained_lora_model("cogvideox_5b", targets="[attention.dense]", dropout=0.5)
    x, t, context, _ = tiny_inputs(tiny_config("cogvideox_5b"))
    with torch.no_grad():
        assert torch.equal(model(x, t, context), model(x, t, context))
        model.train()
        assert not torch.equal(model(x, t, context), model(x, t, context))


def test_config_errors_are_explained():
    with pytest.raises(ConfigError, match=r"targets must be distinct names out of .*found \['attention.qkv'\]"):
        sat_video.build_dit(_lora_config("cogvideox_5b", targets="[attention.qkv]"))
    with pytest.raises(ConfigError, match="rank must be positive, found 0"):
        sat_video.build_dit(_lora_config("cogvideox_5b", rank=0))


# ---------------------------------------------------------------------- merge and export


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_model_equals_the_unmerged_one(variant):
    model = _trained_lora_model(variant)
    plain = _without_lora(variant, model)
    x, t, context, ofs = tiny_inputs(tiny_config(variant))
    with torch.no_grad():
        ours, merged = model(x, t, context, ofs=ofs), plain(x, t, context, ofs=ofs)
        base = sat_video.build_dit(tiny_config(variant))
        base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mixins.lora.")})
        base_out = base.eval()(x, t, context, ofs=ofs)
        effect = _max_diff(ours, base_out)
    diff = _max_diff(ours, merged)
    print(f"{variant}: max |unmerged - merged| = {diff:.2e} (LoRA changes the output by {effect:.2e})")
    assert_close_rel(ours, merged, what=variant)
    _assert_changed(ours, base_out)


@pytest.fixture(scope="module")
def exported_lora(tmp_path_factory):
    """A trained-looking LoRA model (all four targets) per variant, saved and exported both ways by the CLI."""
    out = {}
    for variant in ("cogvideox_2b", "cogvideox_5b"):
        folder = tmp_path_factory.mktemp(variant)
        model = _trained_lora_model(variant, seed=3)
        sat_video.save_checkpoint(model, folder / "sat", 5)
        args = ["--base", *_base(variant), LORA_YAML, *_lora_overrides(), "--ckpt", str(folder / "sat")]
        assert convert_to_diffusers([*args, "--out", str(folder / "adapter"), "--lora-adapter"]) == 0
        assert convert_to_diffusers([*args, "--out", str(folder / "merged")]) == 0
        out[variant] = (model, folder)
    return out


def _diffusers_forward(hf, variant, inputs):
    x, t, context, _ = inputs
    rope = diffusers_rotary_embedding(DiTConfig.from_config(tiny_config(variant)), x.shape[1], *x.shape[3:])
    with torch.no_grad():
        return hf(x, context, t, image_rotary_emb=rope, return_dict=False)[0]


@pytest.mark.parametrize("loader", ["load_lora_adapter", "pipeline.load_lora_weights"])
@pytest.mark.parametrize("variant", ["cogvideox_2b", "cogvideox_5b"])
def test_diffusers_with_the_exported_adapter_matches_our_model(exported_lora, variant, loader):
    model, folder = exported_lora[variant]
    inputs = tiny_inputs(tiny_config(variant))
    with torch.no_grad():
        ours = model(*inputs[:3])
    hf = CogVideoXTransformer3DModel.from_pretrained(folder / "adapter" / "transformer").eval()
    without = _diffusers_forward(hf, variant, inputs)
    if loader == "load_lora_adapter":
        hf.load_lora_adapter(str(folder / "adapter" / LORA_WEIGHTS), prefix="transformer")
    else:
        scheduler = CogVideoXDDIMScheduler.from_pretrained(folder / "adapter" / "scheduler")
        pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=hf, scheduler=scheduler)
        pipe.load_lora_weights(folder / "adapter")
    with_adapter = _diffusers_forward(hf, variant, inputs)
    merged_model = CogVideoXTransformer3DModel.from_pretrained(folder / "merged" / "transformer").eval()
    merged = _diffusers_forward(merged_model, variant, inputs)
    diff, merged_diff = _max_diff(ours, with_adapter), _max_diff(ours, merged)
    print(
        f"{variant} via {loader}: max |ours - diffusers+adapter| = {diff:.2e}, |ours - diffusers merged| = {merged_diff:.2e}, "
        f"adapter effect {_max_diff(with_adapter, without):.2e}"
    )
    assert_close_rel(with_adapter, ours, what="diffusers with the adapter")
    assert_close_rel(merged, ours, what="diffusers merged")
    _assert_changed(with_adapter, without)


def test_adapter_file_holds_diffusers_keys_with_the_scale_in_lora_b(exported_lora):
    from safetensors.torch import load_file

    model, folder = exported_lora["cogvideox_5b"]
    adapter = load_file(str(folder / "adapter" / LORA_WEIGHTS))
    modules = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]
    assert set(adapter) == {
        f"transformer.transformer_blocks.{i}.{m}.lora_{ab}.weight"
        for i in range(model.dit_config.num_layers)
        for m in modules
        for ab in "AB"
    }
    state = model.state_dict()
    lora_b = state["mixins.lora.layers.1.attention.query_key_value.matrix_B.1"]
    assert_identical(adapter["transformer.transformer_blocks.1.attn1.to_k.lora_B.weight"], lora_b * model.mixins.lora.scale)
    assert torch.equal(
        adapter["transformer.transformer_blocks.1.attn1.to_k.lora_A.weight"],
        state["mixins.lora.layers.1.attention.query_key_value.matrix_A.1"],
    )


def test_export_of_the_moving_average_equals_the_export_of_those_weights(tmp_path):
    """``--weights ema``: the average's LoRA factors over the saved weights, merged and as the adapter, are exported as a
    checkpoint holding those weights would be."""
    from safetensors.torch import load_file

    from sat_video.formats.sat_checkpoint import EMA_STATES

    live, averaged = _trained_lora_model("cogvideox_5b", seed=3), _trained_lora_model("cogvideox_5b", seed=4)
    factors = {key: value for key, value in averaged.state_dict().items() if key.startswith("mixins.lora.")}
    sat_video.save_checkpoint(live, tmp_path / "run", 5)
    torch.save({"module": {SAT_PREFIX + key: value for key, value in factors.items()}}, tmp_path / "run" / "5" / EMA_STATES)
    live.load_state_dict(factors, strict=False)  # what the average stands for: the live base, the averaged factors
    sat_video.save_checkpoint(live, tmp_path / "expected", 5)
    args = ["--base", *_base("cogvideox_5b"), LORA_YAML, *_lora_overrides()]
    for name, extra in (("merged", []), ("adapter", ["--lora-adapter"])):
        assert convert_to_diffusers([*args, "--ckpt", str(tmp_path / "run"), "--weights", "ema",
                                     "--out", str(tmp_path / f"ema_{name}"), *extra]) == 0
        assert convert_to_diffusers([*args, "--ckpt", str(tmp_path / "expected"), "--out", str(tmp_path / name), *extra]) == 0
        files = ["transformer/diffusion_pytorch_model.safetensors", *([LORA_WEIGHTS] if extra else [])]
        for file in files:
            got, expected = load_file(str(tmp_path / f"ema_{name}" / file)), load_file(str(tmp_path / name / file))
            assert got.keys() == expected.keys()
            for key in expected:
                assert_identical(got[key], expected[key], what=f"{name} {file} {key}")


# ---------------------------------------------------------------------- SAT LoRA checkpoints and loading rules


def _sat_lora_checkpoint(tmp_path, variant="cogvideox_5b", rank=4):
    torch.manual_seed(0)
    source = randomize_(sat_video.build_dit(tiny_config(variant)))
    state = _sat_lora_state(source, rank, torch.Generator().manual_seed(1))
    torch.save({"module": {SAT_PREFIX + k: v for k, v in state.items()}}, tmp_path / "sat_lora.pt")
    return state, tmp_path / "sat_lora.pt"


def test_sat_lora_checkpoint_loads_into_the_mixin_and_matches_the_merged_load(tmp_path):
    state, file = _sat_lora_checkpoint(tmp_path)
    model = sat_video.build_dit(_lora_config("cogvideox_5b", alpha=1.0, targets="[attention.query_key_value, attention.dense]"))
    sat_video.load_checkpoint(model, file)
    loaded = model.state_dict()
    assert torch.equal(
        loaded["mixins.lora.layers.1.attention.query_key_value.matrix_B.2"],
        state["transformer.layers.1.attention.query_key_value.matrix_B.2"],
    )
    assert torch.equal(
        loaded["transformer.layers.1.attention.dense.weight"], state["transformer.layers.1.attention.dense.original.weight"]
    )
    merged = sat_video.load_checkpoint(sat_video.build_dit(tiny_config("cogvideox_5b")), file)
    x, t, context, _ = tiny_inputs(tiny_config("cogvideox_5b"))
    with torch.no_grad():
        ours, theirs = model.eval()(x, t, context), merged.eval()(x, t, context)
    print(f"SAT LoRA checkpoint: max |LoRA mixin - merged load| = {_max_diff(ours, theirs):.2e}")
    assert_close_rel(ours, theirs)


def test_sat_lora_checkpoint_exports_as_a_diffusers_adapter(tmp_path):
    _, file = _sat_lora_checkpoint(tmp_path)
    assert (
        convert_to_diffusers(
            ["--base", *_base("cogvideox_5b"), "--ckpt", str(file), "--out", str(tmp_path / "hf"), "--lora-adapter"]
        )
        == 0
    )
    hf = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "hf" / "transformer").eval()
    hf.load_lora_adapter(str(tmp_path / "hf" / LORA_WEIGHTS), prefix="transformer")
    merged = sat_video.load_checkpoint(sat_video.build_dit(tiny_config("cogvideox_5b")), file).eval()
    inputs = tiny_inputs(tiny_config("cogvideox_5b"))
    with torch.no_grad():
        ours, theirs = merged(*inputs[:3]), _diffusers_forward(hf, "cogvideox_5b", inputs)
    print(f"SAT LoRA checkpoint -> diffusers adapter: max |merged SAT - diffusers+adapter| = {_max_diff(ours, theirs):.2e}")
    assert_close_rel(theirs, ours)


def test_rank_mismatch_names_the_sat_key_and_both_shapes(tmp_path):
    _, file = _sat_lora_checkpoint(tmp_path, rank=4)
    model = sat_video.build_dit(_lora_config("cogvideox_5b", rank=8, targets="[attention.query_key_value, attention.dense]"))
    with pytest.raises(CheckpointError) as err:
        sat_video.load_checkpoint(model, file)
    message = str(err.value)
    assert "LoRA weights of rank 4, but mixin 'lora' has rank 8 (model.dit.mixins.lora.rank)" in message
    assert "transformer.layers.0.attention.query_key_value.matrix_A.0: checkpoint (4, 64) vs model (8, 64)" in message


@pytest.mark.parametrize("on_meta", [False, True], ids=["cpu", "meta"])
def test_base_checkpoint_loads_into_a_lora_model_with_fresh_adapters(tmp_path, on_meta):
    torch.manual_seed(0)
    base = randomize_(sat_video.build_dit(tiny_config("cogvideox_5b"))).eval()
    sat_video.save_checkpoint(base, tmp_path, 1)
    with torch.device("meta" if on_meta else "cpu"):
        model = sat_video.build_dit(_lora_config("cogvideox_5b"))
    sat_video.load_checkpoint(model, tmp_path)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if ".matrix_B." in n)
    x, t, context, _ = tiny_inputs(tiny_config("cogvideox_5b"))
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, context), base(x, t, context))


def test_only_the_lora_keys_may_be_missing(tmp_path):
    model = _trained_lora_model("cogvideox_5b")
    state = model.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("transformer.layers.1.mlp.")}, tmp_path / "no_mlp.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(4\)"):
        sat_video.load_checkpoint(sat_video.build_dit(_lora_config("cogvideox_5b")), tmp_path / "no_mlp.pt")
    torch.save({k: v for k, v in state.items() if not k.startswith("mixins.lora.layers.1.")}, tmp_path / "half_lora.pt")
    with pytest.raises(
        CheckpointError, match=r"missing keys .*\n.*mixins\.lora\.layers\.1\.attention\.query_key_value\.matrix_A\.0"
    ):
        sat_video.load_checkpoint(sat_video.build_dit(_lora_config("cogvideox_5b")), tmp_path / "half_lora.pt")


def test_lora_run_checkpoint_without_the_mixin_in_the_config_is_explained(tmp_path, capsys):
    sat_video.save_checkpoint(_trained_lora_model("cogvideox_5b"), tmp_path / "run", 1)
    with pytest.raises(
        CheckpointError, match=r"holds LoRA adapters under mixins.lora.\* \(rank 4\), but the config has no LoRA mixin"
    ):
        sat_video.load_checkpoint(sat_video.build_dit(tiny_config("cogvideox_5b")), tmp_path / "run")
    assert (
        convert_to_diffusers(["--base", *_base("cogvideox_5b"), "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
        == 2
    )
    assert "configs/lora.yaml" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_lora_alpha_cannot_contradict_the_mixin(tmp_path):
    _, file = _sat_lora_checkpoint(tmp_path)
    model = sat_video.build_dit(_lora_config("cogvideox_5b", alpha=1.0, targets="[attention.query_key_value, attention.dense]"))
    with pytest.raises(CheckpointError, match=r"lora_alpha=2.0 given, but LoRA mixin 'lora' has alpha 1.0"):
        sat_video.load_checkpoint(model, file, lora_alpha=2.0)


def test_adapter_export_needs_lora_weights(tmp_path, capsys):
    torch.manual_seed(0)
    sat_video.save_checkpoint(sat_video.build_dit(tiny_config("cogvideox_5b")), tmp_path / "base", 1)
    assert (
        convert_to_diffusers(
            ["--base", *_base("cogvideox_5b"), "--ckpt", str(tmp_path / "base"), "--out", str(tmp_path / "hf"), "--lora-adapter"]
        )
        == 2
    )
    assert "holds no SAT LoRA weights and the config no lora mixin" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------- training (one rank, in this process)


@pytest.mark.slow
def test_lora_training_run_changes_only_lora_weights_and_resumes(train_assets, tmp_path):
    torch.manual_seed(0)
    base = randomize_(sat_video.build_dit(tiny_config("cogvideox_2b")))
    sat_video.save_checkpoint(base, tmp_path / "base", 1)
    save = tmp_path / "run"
    configs = [*BASE, str(ROOT / "configs" / "lora.yaml")]

    def train(*overrides):
        train_here(train_assets, save, f"train.init_checkpoint={tmp_path / 'base'}", "model.dit.mixins.lora.rank=4",
                   "train.save_interval=2", *overrides, base=configs)

    train("train.train_iters=2")
    after_two = {k[len(SAT_PREFIX) :]: v for k, v in read_state_dict(save).items()}
    initial = base.state_dict()
    lora_keys = {k for k in after_two if k.startswith("mixins.lora.")}
    assert set(after_two) - lora_keys == set(initial)
    assert all(torch.equal(after_two[k], v) for k, v in initial.items()), "a frozen base weight changed"
    assert all(after_two[k].abs().sum() > 0 for k in lora_keys if ".matrix_B." in k), "B still zero: the adapters did not train"

    train("train.train_iters=3", "train.resume=latest")
    after_three = {k[len(SAT_PREFIX) :]: v for k, v in read_state_dict(save).items()}
    assert (save / "latest").read_text().strip() == "3"
    assert all(torch.equal(after_three[k], v) for k, v in initial.items())
    assert any(not torch.equal(after_three[k], after_two[k]) for k in lora_keys)
    reloaded = sat_video.build_dit(sat_video.load_config(save / "config.yaml"))
    sat_video.load_checkpoint(reloaded, save)
    assert isinstance(reloaded.mixins.lora, LoRAMixin) and reloaded.mixins.lora.config.rank == 4
