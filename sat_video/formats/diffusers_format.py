"""Map sat_video DiTs to diffusers' ``CogVideoXTransformer3DModel`` and back: config and weights.

Most keys are renames (``KEYS_RENAME_TEMPLATES``); two need reshuffling: the fused
``query_key_value`` (split into ``to_q / to_k / to_v``) and the 12-chunk expert AdaLN modulation (split
into ``norm1.linear`` = video + text attention chunks and ``norm2.linear`` = the MLP chunks).
Entries the model derives (RoPE tables, the 2B sin-cos table) have no diffusers counterpart.

One difference is folded into the weights rather than ignored: SAT's final-layer LayerNorm uses eps
1e-6, diffusers' ``norm_out.norm`` the model-wide 1e-5. Its only input is the block stack's closing
LayerNorm (``norm_final``), and ``LN(c * y, eps) == LN(y, eps / c^2)``, so scaling that closing norm's
affine weight and bias by ``c = sqrt(1e-5 / 1e-6)`` makes diffusers compute exactly SAT's function.
Importing divides by ``c`` again.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from mixins.final_layer import FINAL_NORM_EPS
from sat_video.common.errors import ConversionError, OutputExistsError
from sat_video.diffusion.schedule import scheduler_config
from sat_video.model.build import build_mixin
from sat_video.model.config import DiTConfig

# Built-in mixin types that diffusers can express, by role.
ROLE_TYPES = {
    "patch_embed": "image_patch_embed",
    "adaln": "adaln",
    "final_layer": "final_layer",
}
POSITION_TYPES = ("sincos_interpolated", "rotary_3d")
POSITION_HOOKS = ("add_position", "process_qkv")
"""Where positions reach a model: added to the tokens, or rotating queries and keys. A mixin that provides neither
leaves positions alone (LoRA, factorised attention, a timestep token, ...)."""
QK_LAYERNORM_TYPES = ("adaln", "qk_layernorm")
"""Built-in types whose ``process_qkv`` is diffusers' q/k LayerNorm (``attn1.norm_q`` / ``norm_k``), which moves no position."""

# SAT template -> diffusers template; {i} is a layer index, {pe}/{pos}/{ada}/{fin} the mixin names.
KEYS_RENAME_TEMPLATES = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("ofs_embed.0.", "ofs_embedding.linear_1."),
    ("ofs_embed.2.", "ofs_embedding.linear_2."),
    ("mixins.{pe}.proj.", "patch_embed.proj."),
    ("mixins.{pe}.text_proj.", "patch_embed.text_proj."),
    ("mixins.{pos}.pos_embedding", "patch_embed.pos_embedding"),
    ("transformer.layers.{i}.input_layernorm.", "transformer_blocks.{i}.norm1.norm."),
    ("transformer.layers.{i}.post_attention_layernorm.", "transformer_blocks.{i}.norm2.norm."),
    ("transformer.layers.{i}.attention.dense.", "transformer_blocks.{i}.attn1.to_out.0."),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.", "transformer_blocks.{i}.ff.net.2."),
    ("transformer.final_layernorm.", "norm_final."),
    ("mixins.{ada}.query_layernorm_list.{i}.", "transformer_blocks.{i}.attn1.norm_q."),
    ("mixins.{ada}.key_layernorm_list.{i}.", "transformer_blocks.{i}.attn1.norm_k."),
    ("mixins.{fin}.norm_final.", "norm_out.norm."),
    ("mixins.{fin}.linear.", "proj_out."),
    ("mixins.{fin}.adaLN_modulation.1.", "norm_out.linear."),
]
QKV_KEY = re.compile(r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$")
HF_QKV_KEY = re.compile(r"^transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)$")
DIFFUSERS_NORM_EPS = 1e-5
EPS_FOLD = math.sqrt(DIFFUSERS_NORM_EPS / FINAL_NORM_EPS)
HF_NORM_LINEAR_KEY = re.compile(r"^transformer_blocks\.(\d+)\.norm([12])\.linear\.(weight|bias)$")


def mixin_names(dit_config: DiTConfig) -> dict[str, str]:
    """Mixin name per role (``pe``, ``pos``, ``ada``, ``fin``); refuse mixins diffusers cannot express."""
    by_type: dict[str, str] = {}
    for name, entry in dit_config.mixins.items():
        by_type.setdefault(entry["type"], name)
    unsupported = [f"{n} ({e['type']})" for n, e in dit_config.mixins.items()
                   if e["type"] not in (*ROLE_TYPES.values(), *POSITION_TYPES)]
    positions = [t for t in POSITION_TYPES if t in by_type]
    missing = [t for t in ROLE_TYPES.values() if t not in by_type]
    if unsupported or missing or len(positions) != 1 or len(by_type) != len(dit_config.mixins):
        raise ConversionError(
            "diffusers' CogVideoXTransformer3DModel needs exactly image_patch_embed, adaln, final_layer and one "
            f"of {POSITION_TYPES}; this model has: "
            + ", ".join(f"{n} ({e['type']})" for n, e in dit_config.mixins.items())
            + (f". Unsupported: {', '.join(unsupported)}" if unsupported else "")
        )
    return {
        "pe": by_type["image_patch_embed"],
        "pos": by_type[positions[0]],
        "ada": by_type["adaln"],
        "fin": by_type["final_layer"],
    }


def to_diffusers_config(dit_config: DiTConfig) -> dict[str, Any]:
    """The ``CogVideoXTransformer3DModel`` config of the same model."""
    names = mixin_names(dit_config)
    pos, ada = dit_config.mixins[names["pos"]], dit_config.mixins[names["ada"]]
    if not ada.get("qk_layernorm", True):
        raise ConversionError("diffusers' CogVideoX blocks always apply q/k LayerNorm; this model has qk_layernorm: false")
    rotary = pos["type"] == "rotary_3d"
    if rotary and float(pos.get("theta", 10000.0)) != 10000.0:
        raise ConversionError(f"diffusers' CogVideoX RoPE uses theta 10000; this model uses {pos['theta']}")
    spatial, temporal = 1.875, 1.0  # diffusers' defaults; unused with RoPE
    if not rotary:
        spatial, temporal = pos.get("height_interpolation", 1.0), pos.get("time_interpolation", 1.0)
        if pos.get("width_interpolation", 1.0) != spatial:
            raise ConversionError(
                f"diffusers has one spatial interpolation scale; this model interpolates height by {spatial} "
                f"and width by {pos.get('width_interpolation')}"
            )
    return {
        "num_attention_heads": dit_config.num_attention_heads,
        "attention_head_dim": dit_config.head_dim,
        "in_channels": dit_config.in_channels,
        "out_channels": dit_config.out_channels,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "time_embed_dim": dit_config.time_embed_dim,
        "ofs_embed_dim": dit_config.ofs_embed_dim,
        "text_embed_dim": dit_config.text_hidden_size,
        "num_layers": dit_config.num_layers,
        "dropout": 0.0,
        "attention_bias": True,
        "sample_width": dit_config.latent_width,
        "sample_height": dit_config.latent_height,
        "sample_frames": dit_config.num_frames,
        "patch_size": dit_config.patch_size,
        "patch_size_t": dit_config.patch_size_t,
        "temporal_compression_ratio": dit_config.temporal_compression_ratio,
        "max_text_seq_length": dit_config.text_length,
        "activation_fn": "gelu-approximate",
        "timestep_activation_fn": "silu",
        "norm_elementwise_affine": True,
        "norm_eps": DIFFUSERS_NORM_EPS,
        "spatial_interpolation_scale": float(spatial),
        "temporal_interpolation_scale": float(temporal),
        "use_rotary_positional_embeddings": rotary,
        "use_learned_positional_embeddings": bool(rotary and pos.get("learned_table", False)),
        "patch_bias": True,
    }


def from_diffusers_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The ``model.dit`` section for a diffusers ``CogVideoXTransformer3DModel`` config."""
    fixed = {
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "activation_fn": "gelu-approximate",
        "timestep_activation_fn": "silu",
        "norm_elementwise_affine": True,
        "attention_bias": True,
    }
    odd = {k: hf[k] for k, v in fixed.items() if k in hf and hf[k] != v}
    if odd:
        raise ConversionError(f"diffusers config values sat_video's CogVideoX mixins do not implement: {odd}")
    if hf.get("attention_head_dim", 64) * hf["num_attention_heads"] % 16:
        raise ConversionError("hidden size must be a multiple of 16")
    rotary = hf.get("use_rotary_positional_embeddings", False)
    position = (
        {"type": "rotary_3d", "theta": 10000.0, "learned_table": bool(hf.get("use_learned_positional_embeddings", False))}
        if rotary
        else {
            "type": "sincos_interpolated",
            "height_interpolation": hf.get("spatial_interpolation_scale", 1.875),
            "width_interpolation": hf.get("spatial_interpolation_scale", 1.875),
            "time_interpolation": hf.get("temporal_interpolation_scale", 1.0),
        }
    )
    return {
        "hidden_size": hf["num_attention_heads"] * hf.get("attention_head_dim", 64),
        "num_layers": hf["num_layers"],
        "num_attention_heads": hf["num_attention_heads"],
        "in_channels": hf["in_channels"],
        "out_channels": hf.get("out_channels") or hf["in_channels"],
        "patch_size": hf.get("patch_size", 2),
        "patch_size_t": hf.get("patch_size_t"),
        "latent_height": hf.get("sample_height", 60),
        "latent_width": hf.get("sample_width", 90),
        "num_frames": hf.get("sample_frames", 49),
        "temporal_compression_ratio": hf.get("temporal_compression_ratio", 4),
        "text_length": hf.get("max_text_seq_length", 226),
        "text_hidden_size": hf.get("text_embed_dim", 4096),
        "time_embed_dim": hf.get("time_embed_dim", 512),
        "ofs_embed_dim": hf.get("ofs_embed_dim"),
        "mixins": {
            "patch_embed": {"type": "image_patch_embed"},
            "adaln_layer": {"type": "adaln", "qk_layernorm": True},
            "pos_embed": position,
            "final_layer": {"type": "final_layer"},
        },
    }


def _template_regex(template: str, names: dict[str, str]) -> tuple[re.Pattern, str]:
    filled = template.format(i="\0", **names)
    pattern = "^" + re.escape(filled).replace("\0", r"(\d+)")
    return re.compile(pattern), filled.replace("\0", r"\1")


def _rename(key: str, pairs: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, replacement in pairs:
        if pattern.match(key):
            return pattern.sub(replacement.replace("\\1", r"\g<1>"), key, count=1)
    return None


def to_diffusers_state_dict(state: dict[str, torch.Tensor], dit_config: DiTConfig) -> dict[str, torch.Tensor]:
    """Our (prefix-free, LoRA-merged) DiT state dict -> diffusers keys."""
    names = mixin_names(dit_config)
    pairs = [_template_regex(sat, names) for sat, _ in KEYS_RENAME_TEMPLATES]
    pairs = [(p, _template_regex(hf, names)[1]) for (p, _), (_, hf) in zip(pairs, KEYS_RENAME_TEMPLATES)]
    adaln_key = re.compile(rf"^mixins\.{re.escape(names['ada'])}\.adaLN_modulations\.(\d+)\.1\.(weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if match := QKV_KEY.match(key):
            layer, kind = match.groups()
            for letter, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"transformer_blocks.{layer}.attn1.to_{letter}.{kind}"] = part.clone()
        elif match := adaln_key.match(key):
            layer, kind = match.groups()
            chunks = value.chunk(12, dim=0)
            out[f"transformer_blocks.{layer}.norm1.linear.{kind}"] = torch.cat(chunks[0:3] + chunks[6:9])
            out[f"transformer_blocks.{layer}.norm2.linear.{kind}"] = torch.cat(chunks[3:6] + chunks[9:12])
        elif (renamed := _rename(key, pairs)) is not None:
            out[renamed] = value * EPS_FOLD if renamed.startswith("norm_final.") else value
        else:
            raise ConversionError(f"no diffusers equivalent for key '{key}'")
    return out


def from_diffusers_state_dict(hf_state: dict[str, torch.Tensor], dit_config: DiTConfig) -> dict[str, torch.Tensor]:
    """diffusers keys -> our DiT state dict (the inverse of :func:`to_diffusers_state_dict`)."""
    names = mixin_names(dit_config)
    pairs = [_template_regex(hf, names) for _, hf in KEYS_RENAME_TEMPLATES]
    pairs = [(p, _template_regex(sat, names)[1]) for (p, _), (sat, _) in zip(pairs, KEYS_RENAME_TEMPLATES)]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    norms: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        if match := HF_QKV_KEY.match(key):
            layer, letter, kind = match.groups()
            qkv.setdefault((layer, kind), {})[letter] = value
        elif match := HF_NORM_LINEAR_KEY.match(key):
            layer, which, kind = match.groups()
            norms.setdefault((layer, kind), {})[which] = value
        elif (renamed := _rename(key, pairs)) is not None:
            out[renamed] = value / EPS_FOLD if key.startswith("norm_final.") else value
        else:
            raise ConversionError(f"no sat_video equivalent for diffusers key '{key}'")
    for (layer, kind), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise ConversionError(f"layer {layer}: to_q/to_k/to_v {kind} incomplete (found {sorted(parts)})")
        out[f"transformer.layers.{layer}.attention.query_key_value.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for (layer, kind), parts in norms.items():
        if set(parts) != {"1", "2"}:
            raise ConversionError(f"layer {layer}: norm1.linear / norm2.linear {kind} incomplete")
        attn, mlp = parts["1"].chunk(2, dim=0), parts["2"].chunk(2, dim=0)
        # SAT order: video attention, video MLP, text attention, text MLP (each shift, scale, gate).
        out[f"mixins.{names['ada']}.adaLN_modulations.{layer}.1.{kind}"] = torch.cat([attn[0], mlp[0], attn[1], mlp[1]])
    return out


def diffusers_rotary_embedding(dit_config: DiTConfig, frames: int, height: int, width: int):
    """The ``image_rotary_emb`` to pass to diffusers' transformer so that it rotates as SAT does (integer
    positions on the input's own grid, the model's theta) for latents ``[B, frames, C, height, width]``; ``None``
    without RoPE.

    Only the mixins that provide a position hook (:data:`POSITION_HOOKS`, as configured) matter: at most one of
    :data:`POSITION_TYPES`, and q/k LayerNorm, as diffusers has them. Any other mixin (LoRA, say) may be present.
    """
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    with torch.device("meta"):  # no weights: only which hooks each mixin provides
        mixins = {name: build_mixin(dit_config, entry) for name, entry in dit_config.mixins.items()}
    positional = {name: dit_config.mixins[name]["type"] for name, mixin in mixins.items()
                  if set(POSITION_HOOKS) & set(mixin.implemented_hooks())}
    unknown = [name for name, kind in positional.items() if kind not in (*POSITION_TYPES, *QK_LAYERNORM_TYPES)]
    positions = [name for name, kind in positional.items() if kind in POSITION_TYPES]
    if unknown or len(positions) > 1:
        raise ConversionError(
            f"diffusers' CogVideoX takes its positions from one of {POSITION_TYPES} and normalises q/k as "
            f"{' or '.join(QK_LAYERNORM_TYPES)}; the mixins providing {' or '.join(POSITION_HOOKS)} in this model are "
            + ", ".join(f"{name} ({kind})" for name, kind in positional.items())
            + (f". Unsupported: {', '.join(unknown)}" if unknown else "")
        )
    if not positions or positional[positions[0]] != "rotary_3d":
        return None
    grid = dit_config.latent_token_grid(frames, height, width)
    spatial = (grid.height, grid.width)
    return get_3d_rotary_pos_embed(dit_config.head_dim, None, spatial, grid.frames, theta=mixins[positions[0]].config.theta,
                                   grid_type="slice", max_size=spatial)


# ---------------------------------------------------------------------- folders on disk

TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name a pipeline's load_lora_weights(folder) looks for


def write_diffusers_folder(
    state: dict[str, torch.Tensor],
    dit_config: DiTConfig,
    out_dir,
    *,
    snr_shift_scale: float,
    num_train_timesteps: int = 1000,
    lora_adapter: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``out_dir/transformer`` (config.json + safetensors) and ``out_dir/scheduler``, plus
    ``out_dir/pytorch_lora_weights.safetensors`` when given a ``lora_adapter`` (diffusers LoRA keys, see
    :func:`sat_video.formats.sat_lora.lora_to_diffusers`).

    ``out_dir`` must not exist; everything is written into a temporary sibling first and renamed at the
    end, so an interrupted export leaves nothing half-written behind.
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    import diffusers
    from diffusers import CogVideoXDDIMScheduler
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise OutputExistsError(f"{out_dir} already exists; choose a new --out (nothing was written)")
    config = {
        "_class_name": "CogVideoXTransformer3DModel",
        "_diffusers_version": diffusers.__version__,
        **to_diffusers_config(dit_config),
    }
    hf_state = {k: v.contiguous() for k, v in to_diffusers_state_dict(state, dit_config).items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (staging / "transformer").mkdir()
        (staging / "transformer" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(hf_state, str(staging / "transformer" / TRANSFORMER_WEIGHTS), metadata={"format": "pt"})
        CogVideoXDDIMScheduler(**scheduler_config(snr_shift_scale, num_train_timesteps)).save_pretrained(staging / "scheduler")
        if lora_adapter is not None:
            save_file(
                {k: v.contiguous() for k, v in lora_adapter.items()}, str(staging / LORA_WEIGHTS), metadata={"format": "pt"}
            )
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def read_diffusers_transformer(folder) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and weights of a diffusers transformer folder (or a pipeline folder with ``transformer/``);
    single-file and sharded safetensors are both read."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder} holds no config.json (expected a diffusers transformer folder)")
    config = json.loads(config_file.read_text())
    if config.get("_class_name", "CogVideoXTransformer3DModel") != "CogVideoXTransformer3DModel":
        raise ConversionError(f"{config_file}: _class_name is {config['_class_name']}, expected CogVideoXTransformer3DModel")
    index = folder / f"{TRANSFORMER_WEIGHTS}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / TRANSFORMER_WEIGHTS).is_file():
        files = [TRANSFORMER_WEIGHTS]
    else:
        raise ConversionError(f"{folder} holds neither {TRANSFORMER_WEIGHTS} nor its .index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return config, state
