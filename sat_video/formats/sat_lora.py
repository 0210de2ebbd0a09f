"""LoRA weights in their three layouts: SAT's, the LoRA mixin's and diffusers'.

SAT's LoRA (``sat.model.finetune.lora2``) replaces a linear by a module holding
``<linear>.original.{weight,bias}`` plus ``<linear>.matrix_A.{p}`` ``[r, in]`` and ``<linear>.matrix_B.{p}``
``[out / parts, r]``, one pair per output partition (three for the fused ``query_key_value``: q, k, v).
Its output is ``W x + b + (alpha / r) concat_p(B_p A_p x)``; SAT's alpha is 1.

:class:`mixins.lora.LoRAMixin` leaves the base linear where it is (``transformer.layers.{i}.<target>.weight``)
and holds the same matrices under the mixin: ``mixins.<name>.layers.{i}.<target>.matrix_A.{p}`` /
``matrix_B.{p}``. diffusers (PEFT) names them ``transformer.transformer_blocks.{i}.attn1.to_q.lora_A.weight`` /
``lora_B.weight``, one pair per split linear; without stored alphas it applies them with scale 1, so the
export folds ``alpha / r`` into ``lora_B``.

Errors are :class:`CheckpointError` naming the key; :mod:`sat_video.formats.sat_checkpoint` adds the file.
"""

from __future__ import annotations

import re

import torch

from mixins.lora import LORA_TARGETS
from sat_video.common.errors import CheckpointError

# Block linears an adapter may wrap -> their diffusers modules, one per output partition.
DIFFUSERS_MODULES: dict[str, tuple[str, ...]] = dict(zip(LORA_TARGETS, (
    ("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn1.to_out.0",), ("ff.net.0.proj",), ("ff.net.2",))))

_SAT_KEY = re.compile(r"^(?P<base>.+)\.(?:original\.(?P<kind>weight|bias)|matrix_(?P<ab>[AB])\.(?P<part>\d+))$")
_LAYER_LINEAR = re.compile(r"^transformer\.layers\.(?P<layer>\d+)\.(?P<target>.+)$")


def _is_sat_key(key: str) -> bool:
    return not key.startswith("mixins.") and _SAT_KEY.match(key) is not None


def has_sat_lora(state_dict: dict) -> bool:
    """Whether ``state_dict`` (prefix-free) holds SAT-layout LoRA weights."""
    return any(_is_sat_key(key) for key in state_dict)


def _parts(state: dict[str, torch.Tensor], prefix: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(matrix_A.{0..P-1}, matrix_B.{0..P-1})`` under ``prefix``, refusing gaps and unpaired matrices."""
    found = {}
    for key in state:
        if key.startswith(prefix) and (match := re.fullmatch(r"matrix_([AB])\.(\d+)", key[len(prefix):])):
            found[(match[1], int(match[2]))] = state[key]
    if not found:
        raise CheckpointError(f"no LoRA matrices under '{prefix}'")
    count = 1 + max(p for _, p in found)
    missing = [f"{prefix}matrix_{ab}.{p}" for ab in "AB" for p in range(count) if (ab, p) not in found]
    if missing:
        raise CheckpointError(f"incomplete LoRA matrices: missing {', '.join(missing)}")
    return [found[("A", p)] for p in range(count)], [found[("B", p)] for p in range(count)]


def _add_low_rank(weight: torch.Tensor, matrices_a, matrices_b, scale: float, where: str) -> torch.Tensor:
    """``weight`` with ``scale * B_p @ A_p`` added to its row block ``p`` (computed in float64)."""
    parts = len(matrices_a)
    rows = weight.shape[0] // parts
    merged = weight.double().clone()
    for p, (lora_a, lora_b) in enumerate(zip(matrices_a, matrices_b)):
        if weight.shape[0] % parts or lora_a.shape[1] != weight.shape[1] or lora_b.shape != (rows, lora_a.shape[0]):
            raise CheckpointError(
                f"{where} part {p}: matrix_A {tuple(lora_a.shape)} / matrix_B {tuple(lora_b.shape)} "
                f"do not fit weight {tuple(weight.shape)} split in {parts}"
            )
        merged[p * rows:(p + 1) * rows] += scale * (lora_b.double() @ lora_a.double())
    return merged.to(weight.dtype)


# ---------------------------------------------------------------------- SAT layout


def merge_sat_lora(state_dict: dict[str, torch.Tensor], alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` with every SAT LoRA-wrapped linear merged into ``<name>.weight``
    (scale ``alpha / r``)."""
    merged = {k: v for k, v in state_dict.items() if not _is_sat_key(k)}
    bases = sorted({_SAT_KEY.match(key)["base"] for key in state_dict if _is_sat_key(key)})
    for base in bases:
        if f"{base}.original.weight" not in state_dict:
            raise CheckpointError(f"LoRA matrices for '{base}' but no '{base}.original.weight'")
        matrices_a, matrices_b = _parts(state_dict, f"{base}.")
        scale = alpha / matrices_a[0].shape[0]
        merged[f"{base}.weight"] = _add_low_rank(state_dict[f"{base}.original.weight"], matrices_a, matrices_b, scale, base)
        if f"{base}.original.bias" in state_dict:
            merged[f"{base}.bias"] = state_dict[f"{base}.original.bias"]
    return merged


def sat_lora_to_mixin(state_dict: dict[str, torch.Tensor], mixin_name: str) -> dict[str, torch.Tensor]:
    """Rename SAT LoRA keys onto the LoRA mixin ``mixin_name`` (``original.*`` back onto the base linear), so
    that training continues from them; nothing is merged."""
    out = {}
    for key, value in state_dict.items():
        if not _is_sat_key(key):
            out[key] = value
            continue
        match = _SAT_KEY.match(key)
        linear = _LAYER_LINEAR.match(match["base"])
        if linear is None or linear["target"] not in LORA_TARGETS:
            raise CheckpointError(f"'{key}': SAT LoRA on '{match['base']}', but the LoRA mixin adapts only "
                             f"transformer.layers.{{i}}.{{{', '.join(LORA_TARGETS)}}}")
        if match["kind"]:
            out[f"{match['base']}.{match['kind']}"] = value
        else:
            out[f"mixins.{mixin_name}.layers.{linear['layer']}.{linear['target']}.matrix_{match['ab']}.{match['part']}"] = value
    return out


def sat_lora_config(state_dict: dict[str, torch.Tensor], alpha: float = 1.0) -> dict:
    """The ``model.dit.mixins`` entry of a LoRA mixin that holds the SAT LoRA weights of ``state_dict``
    (rank and targets read from the weights; SAT stores no alpha)."""
    ranks, targets = set(), set()
    for key, value in state_dict.items():
        if _is_sat_key(key) and (match := _SAT_KEY.match(key))["ab"] == "A":
            ranks.add(value.shape[0])
            if linear := _LAYER_LINEAR.match(match["base"]):
                targets.add(linear["target"])
    if not ranks:
        raise CheckpointError("no SAT LoRA weights (<linear>.matrix_A.{p}) found")
    if len(ranks) > 1:
        raise CheckpointError(f"SAT LoRA matrices of several ranks {sorted(ranks)}; one LoRA mixin has one rank")
    return {"type": "lora", "rank": ranks.pop(), "alpha": float(alpha), "targets": [t for t in LORA_TARGETS if t in targets]}


# ---------------------------------------------------------------------- the mixin's layout


def _mixin_adapters(state: dict[str, torch.Tensor], mixin_name: str) -> dict[tuple[int, str], str]:
    """``(layer, target) -> key prefix`` of every adapter of mixin ``mixin_name`` in ``state``."""
    pattern = re.compile(rf"^(mixins\.{re.escape(mixin_name)}\.layers\.(\d+)\.(.+)\.)matrix_A\.\d+$")
    return {(int(m[2]), m[3]): m[1] for key in state if (m := pattern.match(key))}


def merge_lora(state_dict: dict[str, torch.Tensor], mixin_name: str, scale: float) -> dict[str, torch.Tensor]:
    """The state dict of the same model without its LoRA mixin ``mixin_name``: each adapter folded into its base
    linear (``W[part p] += scale * B_p @ A_p``, in float64)."""
    prefix = f"mixins.{mixin_name}."
    merged = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    for (layer, target), adapter in _mixin_adapters(state_dict, mixin_name).items():
        key = f"transformer.layers.{layer}.{target}.weight"
        matrices_a, matrices_b = _parts(state_dict, adapter)
        merged[key] = _add_low_rank(state_dict[key], matrices_a, matrices_b, scale, adapter.rstrip("."))
    return merged


def lora_to_diffusers(state_dict: dict[str, torch.Tensor], mixin_name: str, scale: float) -> dict[str, torch.Tensor]:
    """The adapters of LoRA mixin ``mixin_name`` as a diffusers LoRA state dict
    (``transformer.transformer_blocks.{i}.attn1.to_q.lora_A.weight``, ...), with ``scale`` folded into ``lora_B``
    because diffusers applies an adapter without stored alphas at scale 1."""
    out = {}
    for (layer, target), adapter in sorted(_mixin_adapters(state_dict, mixin_name).items()):
        if target not in LORA_TARGETS:
            raise CheckpointError(f"'{adapter}matrix_A.0': no diffusers module for LoRA target '{target}'")
        matrices_a, matrices_b = _parts(state_dict, adapter)
        modules = DIFFUSERS_MODULES[target]
        if len(matrices_a) != len(modules):
            raise CheckpointError(f"'{adapter}': {len(matrices_a)} partitions, expected {len(modules)} for '{target}'")
        for module, lora_a, lora_b in zip(modules, matrices_a, matrices_b):
            hf = f"transformer.transformer_blocks.{layer}.{module}"
            out[f"{hf}.lora_A.weight"] = lora_a.clone()
            out[f"{hf}.lora_B.weight"] = (lora_b.double() * scale).to(lora_b.dtype)
    return out
