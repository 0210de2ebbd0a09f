"""fp8-stored frozen weights (model.dit.storage_dtype): upcast values, what stays in the compute dtype, the loss of a
LoRA run against bf16 storage, and the refusals (SFT, ZeRO-3)."""

import copy

import pytest
import torch

import sat_video
from sat_video.common.errors import ConfigError
from sat_video.formats.sat_checkpoint import read_state_dict
from sat_video.model.storage_dtype import STORAGE_DTYPES, check_storage_dtype, store_frozen_weights, stored_linears, weight_bytes
from sat_video.training.optim import select_trainable
from tests.conftest import ROOT, randomize_, tiny_config, tiny_inputs
from tests.numerics import assert_identical
from tests.training.runs import BASE, metrics, train_here

LORA = ["model.dit.mixins.lora.rank=4", "model.dit.mixins.lora.targets=[attention.query_key_value, attention.dense, "
        "mlp.dense_h_to_4h, mlp.dense_4h_to_h]"]
BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def _lora_model(variant="cogvideox_5b", *overrides):
    cfg = sat_video.load_config([ROOT / "configs" / f"{variant}.yaml", ROOT / "configs" / "tiny.yaml",
                                 ROOT / "configs" / "lora.yaml"], [*LORA, *overrides])
    torch.manual_seed(0)
    model = randomize_(sat_video.build_dit(cfg))  # B != 0 and non-zero gates: every weight reaches the output
    select_trainable(model, ["mixins.lora.*"])
    return cfg, model


@pytest.mark.parametrize("storage", sorted(STORAGE_DTYPES))
def test_stored_weights_upcast_to_the_values_of_their_fp8_rounding(storage):
    cfg, model = _lora_model()
    reference = copy.deepcopy(model)  # the same model computing from fp8-rounded weights kept in float32
    with torch.no_grad():
        for linear in stored_linears(reference).values():
            linear.weight.copy_(linear.weight.to(STORAGE_DTYPES[storage]).float())
    stored = store_frozen_weights(model, storage)
    assert len(stored) == 4 * cfg.model.dit.num_layers
    for name, linear in stored_linears(model).items():
        assert linear.weight.dtype == STORAGE_DTYPES[storage]
        assert_identical(linear.weight.float(), stored_linears(reference)[name].weight)

    x, timesteps, context, _ = tiny_inputs(cfg)
    saved = []  # what autograd keeps for backward: the fp8 weights themselves, never an upcast copy of them
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x, timesteps, context)
    expected = reference(x, timesteps, context)
    assert_identical(out, expected)  # the upcast happens before the same matmul
    # every stored linear but the first (its input, from the frozen patch embedding, needs no gradient) saves its weight
    weights = {linear.weight.data_ptr() for linear in stored_linears(model).values()}
    assert len({t.data_ptr() for t in saved if t.dtype == STORAGE_DTYPES[storage]} & weights) == len(stored) - 1
    for linear in stored_linears(model).values():
        upcast = linear.weight.float()
        assert not any(t.shape == upcast.shape and t.dtype == upcast.dtype and torch.equal(t, upcast) for t in saved)

    out.square().mean().backward()
    expected.square().mean().backward()
    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert (param.grad is not None) == name.startswith("mixins.lora."), name
        if param.grad is not None:
            assert_identical(param.grad, reference_params[name].grad)
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing, model.checkpoint_keeps_attention = True, False  # recomputed: upcast again, same grads
    model(x, timesteps, context).square().mean().backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert_identical(param.grad, reference_params[name].grad)
    assert store_frozen_weights(model, storage) == []  # stored once


def test_norms_embeddings_modulations_head_and_lora_stay_in_the_compute_dtype():
    # the I2V 1.5 model carries every kind of module: ofs embedding, tube patches, RoPE + learned table
    cfg, model = _lora_model("cogvideox1.5_5b_i2v", "model.dit.mixins.extra_attention={type: factorized_attention, "
                             "arrangement: parallel_in_block}", "model.dit.mixins.pos_embed.learned_table=true")
    model.to(torch.bfloat16)
    before = weight_bytes(model)
    store_frozen_weights(model, "float8_e4m3fn")
    fp8 = {name for name, param in model.named_parameters() if param.dtype == torch.float8_e4m3fn}
    layers = range(cfg.model.dit.num_layers)
    expected = {f"transformer.layers.{i}.{linear}.weight" for i in layers for linear in BLOCK_LINEARS}
    expected |= {f"mixins.extra_attention.temporal_attention.{i}.{linear}.weight" for i in layers
                 for linear in ("query_key_value", "dense")}
    assert fp8 == expected
    kept = {name for name, param in model.named_parameters() if param.dtype == torch.bfloat16}
    for name in ("time_embed.0.weight", "ofs_embed.0.weight", "transformer.final_layernorm.weight",
                 "transformer.layers.0.input_layernorm.weight", "transformer.layers.0.attention.query_key_value.bias",
                 "mixins.patch_embed.proj.weight", "mixins.patch_embed.text_proj.weight", "mixins.pos_embed.pos_embedding",
                 "mixins.adaln_layer.adaLN_modulations.0.1.weight", "mixins.adaln_layer.query_layernorm_list.0.weight",
                 "mixins.final_layer.linear.weight", "mixins.final_layer.adaLN_modulation.1.weight",
                 "mixins.lora.layers.0.attention.query_key_value.matrix_A.0"):
        assert name in kept, name
    assert kept | fp8 == {name for name, _ in model.named_parameters()}
    stored = sum(model.get_parameter(name).numel() for name in fp8)
    assert before - weight_bytes(model) == stored  # bf16 -> fp8: one byte less per stored weight


def test_sft_and_zero3_are_refused_with_the_way_out():
    with torch.device("meta"):
        model = sat_video.build_dit(tiny_config("cogvideox_2b"))
    with pytest.raises(ConfigError, match=r"storage_dtype=float8_e4m3fn .*train.trainable \['\*'\] trains 8 of them "
                                          r"\(transformer.layers.0.attention.query_key_value.weight.*for full fine-tuning "
                                          r"\(SFT\) set model.dit.storage_dtype: null"):
        check_storage_dtype(model, "float8_e4m3fn", ["*"], zero_stage=2)
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage=3: .*expected zero_stage 0, 1 or 2"):
        check_storage_dtype(model, "float8_e5m2", ["mixins.lora.*"], zero_stage=3)
    check_storage_dtype(model, "float8_e5m2", ["mixins.lora.*", "transformer.layers.*.bias"], zero_stage=2)
    check_storage_dtype(model, None, ["*"], zero_stage=3)  # without fp8 storage, SFT and ZeRO-3 are none of its business

    model = sat_video.build_dit(tiny_config("cogvideox_2b"))  # everything trains: refused at the weights too
    with pytest.raises(ConfigError, match=r"the model \(requires_grad\) trains 8 of them"):
        store_frozen_weights(model, "float8_e4m3fn")
    assert all(param.dtype == torch.float32 for param in model.parameters())


def test_the_trainer_refuses_sft_with_fp8_storage_before_building_the_engine(train_assets, tmp_path):
    with pytest.raises(ConfigError, match=r"train.trainable \['\*'\] trains .*model.dit.storage_dtype: null"):
        train_here(train_assets, tmp_path / "run", "model.dit.storage_dtype=float8_e4m3fn")


def test_a_checkpoint_with_fp8_weights_loads_on_meta_in_the_dtype_of_its_other_weights(tmp_path):
    _, model = _lora_model("cogvideox_2b")
    model.to(torch.bfloat16)
    store_frozen_weights(model, "float8_e5m2")
    sat_video.save_checkpoint(model, tmp_path, 1)
    cfg = sat_video.load_config([ROOT / "configs" / "cogvideox_2b.yaml", ROOT / "configs" / "tiny.yaml",
                                 ROOT / "configs" / "lora.yaml"], LORA)
    with torch.device("meta"):
        loaded = sat_video.build_dit(cfg)
    sat_video.load_checkpoint(loaded, tmp_path)
    assert {param.dtype for param in loaded.parameters()} == {torch.bfloat16}  # merges and exports as a bf16 run's
    weights = dict(loaded.named_parameters())
    for name, linear in stored_linears(model).items():
        assert_identical(weights[f"{name}.weight"], linear.weight.to(torch.bfloat16))


@pytest.mark.slow
def test_lora_run_with_fp8_storage_follows_bf16_storage_within_2_percent(train_assets, tmp_path):
    torch.manual_seed(0)
    sat_video.save_checkpoint(randomize_(sat_video.build_dit(tiny_config("cogvideox_2b"))), tmp_path / "base", 1)
    losses = {}
    for storage in ("null", "float8_e4m3fn"):
        save = tmp_path / storage
        train_here(train_assets, save, "deepspeed.precision=bf16", "train.train_iters=50", "train.log_interval=1",
                   "train.save_interval=50", f"train.init_checkpoint={tmp_path / 'base'}", f"model.dit.storage_dtype={storage}",
                   *LORA, base=[*BASE, str(ROOT / "configs" / "lora.yaml")])
        records = metrics(save)
        assert len(records) == 50 and all(record["grad_norm"] > 0 for record in records)  # the adapters train
        losses[storage] = [record["loss"] for record in records]
        saved = read_state_dict(save)
        dtype = torch.float8_e4m3fn if storage != "null" else torch.bfloat16
        assert saved["model.diffusion_model.transformer.layers.0.mlp.dense_h_to_4h.weight"].dtype == dtype
    # The claim of issue #31: within 2% at every logged step (a measured run differed by under 1e-4 relative).
    assert losses["float8_e4m3fn"] == pytest.approx(losses["null"], rel=0.02)
