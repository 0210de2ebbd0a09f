"""Loading SAT checkpoints in every form, strict key checks, LoRA merging and atomic saving."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

import sat_video
from sat_video import CheckpointError
from sat_video.formats.sat_checkpoint import MODEL_STATES, SAT_PREFIX
from tests.conftest import randomize_, tiny_config, tiny_inputs
from tests.numerics import assert_close_rel


def _pair(variant="cogvideox_5b"):
    cfg = tiny_config(variant)
    torch.manual_seed(0)
    source = randomize_(sat_video.build_dit(cfg))
    return cfg, source, sat_video.build_dit(cfg)


def _same(a, b):
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_round_trip_through_every_path_form(tmp_path):
    cfg, source, _ = _pair()
    file = sat_video.save_checkpoint(source, tmp_path / "run", 7)
    assert (tmp_path / "run" / "latest").read_text().strip() == "7"
    assert file == tmp_path / "run" / "7" / MODEL_STATES
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    for path in (tmp_path / "run", tmp_path / "run" / "7", file, tmp_path / "w.safetensors", tmp_path / "plain.pt"):
        target = sat_video.build_dit(cfg)
        sat_video.load_checkpoint(target, path)
        assert _same(source, target), path
    x, t, c, _ = tiny_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(source(x, t, c), target(x, t, c))


def test_saved_keys_use_sat_names(tmp_path):
    _, source, _ = _pair()
    module = torch.load(sat_video.save_checkpoint(source, tmp_path, 1), weights_only=True)["module"]
    assert all(k.startswith(SAT_PREFIX) for k in module)
    for key in ["time_embed.0.weight", "time_embed.2.weight", "mixins.patch_embed.proj.weight",
                "mixins.patch_embed.text_proj.weight", "transformer.layers.1.input_layernorm.weight",
                "transformer.layers.1.attention.query_key_value.weight", "transformer.layers.1.attention.dense.bias",
                "transformer.layers.1.post_attention_layernorm.bias", "transformer.layers.1.mlp.dense_h_to_4h.weight",
                "transformer.layers.1.mlp.dense_4h_to_h.weight", "transformer.final_layernorm.weight",
                "mixins.adaln_layer.adaLN_modulations.1.1.weight", "mixins.adaln_layer.query_layernorm_list.1.weight",
                "mixins.adaln_layer.key_layernorm_list.1.bias", "mixins.final_layer.norm_final.weight",
                "mixins.final_layer.linear.weight", "mixins.final_layer.adaLN_modulation.1.weight"]:
        assert SAT_PREFIX + key in module, key


def test_official_layout_extras_are_accepted(tmp_path):
    """T5 / VAE entries, RoPE tables, the unused position table and the 2B sin-cos table load by name."""
    for variant, extras in [
        (
            "cogvideox_5b",
            {
                "mixins.pos_embed.freqs_sin": torch.zeros(4, 4, 4, 32),
                "mixins.pos_embed.freqs_cos": torch.zeros(4, 4, 4, 32),
                "transformer.position_embeddings.weight": torch.zeros(64, 64),
            },
        ),
        ("cogvideox_2b", {"mixins.pos_embed.pos_embedding": torch.zeros(1, 8 + 64, 64)}),
    ]:
        cfg, source, target = _pair(variant)
        module = {SAT_PREFIX + k: v for k, v in {**source.state_dict(), **extras}.items()}
        module["conditioner.embedders.0.transformer.encoder.weight"] = torch.zeros(3)
        module["first_stage_model.encoder.conv_in.weight"] = torch.zeros(3)
        (tmp_path / variant / "1000").mkdir(parents=True)
        torch.save({"module": module}, tmp_path / variant / "1000" / MODEL_STATES)
        (tmp_path / variant / "latest").write_text("1000")
        sat_video.load_checkpoint(target, tmp_path / variant)
        assert _same(source, target)


def test_a_sat_folder_trained_with_fused_ema_adam_loads_as_before(tmp_path):
    """SAT's FusedEmaAdam keeps its average in DeepSpeed's optimizer partitions beside the weights: the weights load as
    ever, and asking for the average names why there is none to read."""
    cfg, source, target = _pair()
    folder = tmp_path / "sat" / "1000"
    folder.mkdir(parents=True)
    torch.save({"module": {SAT_PREFIX + k: v for k, v in source.state_dict().items()}}, folder / MODEL_STATES)
    flat = torch.cat([p.detach().flatten() for p in source.parameters()])
    torch.save({"optimizer_state_dict": {"base_optimizer_state": {"state": {0: {
        "step": 1000, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat), "ema": flat}}}}},
        folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tmp_path / "sat" / "latest").write_text("1000")
    sat_video.load_checkpoint(target, tmp_path / "sat")
    assert _same(source, target)
    with pytest.raises(CheckpointError, match="FusedEmaAdam average inside the optimizer's partitions"):
        sat_video.load_checkpoint(target, tmp_path / "sat", weights="ema")


def test_wrong_shape_names_the_key(tmp_path):
    cfg, source, target = _pair()
    state = source.state_dict()
    state["mixins.final_layer.linear.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"wrong shapes \(1\):\n    mixins.final_layer.linear.weight: checkpoint \(3, 3\)"):
        sat_video.load_checkpoint(target, tmp_path / "bad.pt")


def test_missing_layer_and_unexpected_keys_are_listed(tmp_path):
    cfg, source, target = _pair()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("transformer.layers.1.")}
    state["mixins.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        sat_video.load_checkpoint(target, tmp_path / "bad.pt")
    message = str(err.value)
    assert "missing keys (12)" in message and "transformer.layers.1.attention.query_key_value.weight" in message
    assert "unexpected keys (1)" in message and "mixins.extra.weight" in message
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), "a failed load must change nothing"


def test_loading_is_weights_only(tmp_path):
    _, source, target = _pair()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"module": source.state_dict(), "payload": Payload()}, handle)
    with pytest.raises(CheckpointError, match="weights-only"):
        sat_video.load_checkpoint(target, tmp_path / "evil.pt")


def test_bad_paths_are_explained(tmp_path):
    _, _, target = _pair()
    with pytest.raises(CheckpointError, match="not found"):
        sat_video.load_checkpoint(target, tmp_path / "nothing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("5")
    with pytest.raises(CheckpointError, match="names iteration '5'"):
        sat_video.load_checkpoint(target, tmp_path / "run")


def test_meta_model_takes_the_checkpoint_tensors(tmp_path):
    cfg, source, _ = _pair()
    sat_video.save_checkpoint(source, tmp_path, 3)
    with torch.device("meta"):
        target = sat_video.build_dit(cfg)
    sat_video.load_checkpoint(target, tmp_path)
    assert not any(p.is_meta for p in target.parameters())
    assert _same(source, target)


def test_save_never_overwrites_and_leaves_no_temporary_files(tmp_path):
    _, source, _ = _pair()
    sat_video.save_checkpoint(source, tmp_path, 1)
    with pytest.raises(FileExistsError):
        sat_video.save_checkpoint(source, tmp_path, 1)
    sat_video.save_checkpoint(source, tmp_path, 1, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["1", "latest", MODEL_STATES])


def _sat_lora_state(source, rank, generator):
    """A SAT LoRA checkpoint: query_key_value (3 partitions) and dense (1) wrapped in every layer."""
    state = dict(source.state_dict())
    for i in range(source.dit_config.num_layers):
        for name, parts in (("query_key_value", 3), ("dense", 1)):
            base = f"transformer.layers.{i}.attention.{name}"
            weight = state.pop(f"{base}.weight")
            state[f"{base}.original.weight"] = weight
            state[f"{base}.original.bias"] = state.pop(f"{base}.bias")
            for p in range(parts):
                state[f"{base}.matrix_A.{p}"] = torch.randn(rank, weight.shape[1], generator=generator)
                state[f"{base}.matrix_B.{p}"] = torch.randn(weight.shape[0] // parts, rank, generator=generator) * 0.1
    return state


def test_sat_lora_checkpoints_are_merged(tmp_path):
    cfg, source, target = _pair()
    rank = 4
    state = _sat_lora_state(source, rank, torch.Generator().manual_seed(1))
    torch.save({"module": {SAT_PREFIX + k: v for k, v in state.items()}}, tmp_path / "lora.pt")
    sat_video.load_checkpoint(target, tmp_path / "lora.pt")
    # reference: the LoRA forward of SAT, y = W x + b + (1/r) * concat_p(B_p A_p x)
    x = torch.randn(5, source.dit_config.hidden_size)
    for i in range(source.dit_config.num_layers):
        for name, parts in (("query_key_value", 3), ("dense", 1)):
            base = f"transformer.layers.{i}.attention.{name}"
            expected = x @ state[f"{base}.original.weight"].T + state[f"{base}.original.bias"]
            expected = (
                expected
                + torch.cat([x @ state[f"{base}.matrix_A.{p}"].T @ state[f"{base}.matrix_B.{p}"].T for p in range(parts)], dim=-1)
                / rank
            )
            linear = target.get_submodule(base)
            assert_close_rel(linear(x), expected)
