"""Read and write DiT weights in SAT's checkpoint layout.

Layout: ``<dir>/latest`` holds the iteration; ``<dir>/<iteration>/mp_rank_00_model_states.pt`` holds
``{"module": state_dict}`` with keys prefixed ``model.diffusion_model.``. Official checkpoints also
carry ``conditioner.*`` (T5) and ``first_stage_model.*`` (VAE), which the DiT ignores, and a few
entries the model derives itself (RoPE tables, the 2B sin-cos table), which are accepted by name.

LoRA: SAT LoRA weights go into the model's LoRA mixin (``mixins/lora.py``), or are merged into the base
weights when it has none; a LoRA mixin may be absent from a checkpoint as a whole (training a LoRA
starts from a base checkpoint), never in part.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import torch
from torch import nn

from sat_video.common.errors import CheckpointError, OutputExistsError
from sat_video.common.files import atomic_write
from sat_video.formats.sat_lora import has_sat_lora, merge_sat_lora, sat_lora_to_mixin
from sat_video.model.storage_dtype import STORAGE_DTYPES

logger = logging.getLogger(__name__)

SAT_PREFIX = "model.diffusion_model."
IGNORED_PREFIXES = ("conditioner.", "first_stage_model.")
MODEL_STATES = "mp_rank_00_model_states.pt"
EMA_STATES = "ema_model_states.pt"
"""Beside :data:`MODEL_STATES` in a checkpoint of a run with ``train.ema``: the moving average of the trained weights
(``{"module": {SAT key: tensor}}``, only the parameters that trained), which ``weights="ema"`` puts over the weights."""
WEIGHTS = ("live", "ema")


def resolve_checkpoint_file(path: str | Path) -> Path:
    """The weights file for a SAT run folder (via ``latest``), an iteration folder, or a file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / MODEL_STATES).is_file():
        return path / MODEL_STATES
    latest = path / "latest"
    if latest.is_file():
        iteration = latest.read_text().strip()
        file = path / iteration / MODEL_STATES
        if not file.is_file():
            raise CheckpointError(f"{latest} names iteration '{iteration}', but {file} does not exist")
        return file
    raise CheckpointError(f"{path} is a folder with neither a 'latest' file nor {MODEL_STATES}")


def read_state_dict(path: str | Path, weights: str = "live") -> dict[str, torch.Tensor]:
    """Load the raw state dict (``module`` of a SAT file, a plain ``.pt`` state dict, or ``.safetensors``).

    ``weights="ema"``: with the moving average of the trained weights (:data:`EMA_STATES`, beside the weights file) in
    place of their values."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights: expected one of {', '.join(WEIGHTS)}, found {weights!r}")
    file = resolve_checkpoint_file(path)
    state = _read_weights_file(file)
    if weights == "ema":
        ema_file = file.with_name(EMA_STATES)
        if not ema_file.is_file():
            raise CheckpointError(f"{file.parent} holds no moving average of the weights ({EMA_STATES}): the run that "
                                  "wrote it had train.ema off (a checkpoint of SAT's own code keeps its FusedEmaAdam "
                                  "average inside the optimizer's partitions, which sat_video does not read); use the "
                                  "live weights")
        average = _read_weights_file(ema_file)
        unknown = sorted(set(average) - set(state))
        if unknown:
            raise CheckpointError(f"{ema_file}: {len(unknown)} key(s) not in {file}, e.g. {unknown[:3]}")
        state.update(average)
    return state


def _read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file}: cannot be read as a weights-only torch file ({err})") from None
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        obj = obj["module"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a state dict or {{'module': state_dict}}")
    return obj


def dit_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``model.diffusion_model.`` and drop T5 / VAE entries."""
    state = {}
    for key, value in raw.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        state[key[len(SAT_PREFIX):] if key.startswith(SAT_PREFIX) else key] = value
    return state


def lora_mixins(model: nn.Module) -> dict:
    """The model's :class:`mixins.lora.LoRAMixin` instances by name."""
    from mixins.lora import LoRAMixin

    return {name: m for name, m in getattr(model, "mixins", {}).items() if isinstance(m, LoRAMixin)}


_ADAPTER_KEY = re.compile(r"^mixins\.(\w+)\.layers\.\d+\..+\.matrix_A\.\d+$")


def _place_lora(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, lora_alpha: float | None
) -> dict[str, torch.Tensor]:
    """SAT LoRA weights go onto the model's LoRA mixin, or are merged when it has none; a LoRA mixin that the
    checkpoint lacks entirely (a base checkpoint) keeps its initialisation."""
    lora = lora_mixins(model)
    from_sat = has_sat_lora(state)
    try:
        if from_sat and not lora:
            return merge_sat_lora(state, 1.0 if lora_alpha is None else lora_alpha)
        if from_sat and len(lora) > 1:
            raise ValueError(f"SAT LoRA weights, but the model has several LoRA mixins ({', '.join(lora)}) to put them in")
        if from_sat:
            state = sat_lora_to_mixin(state, next(iter(lora)))
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None
    stray = {m[1]: state[key].shape[0] for key in state if (m := _ADAPTER_KEY.match(key)) and m[1] not in lora}
    if stray:
        name, rank = next(iter(stray.items()))
        raise CheckpointError(
            f"{source} holds LoRA adapters under mixins.{name}.* (rank {rank}), but the config has no LoRA mixin '{name}': "
            f"stack configs/lora.yaml with that rank and the run's alpha (or use the run's config.yaml)"
        )
    expected = model.state_dict()
    for name, mixin in lora.items():
        if lora_alpha is not None and lora_alpha != mixin.config.alpha:
            raise CheckpointError(
                f"lora_alpha={lora_alpha} given, but LoRA mixin '{name}' has alpha {mixin.config.alpha} "
                f"(its config, model.dit.mixins.{name}.alpha, sets the scale)"
            )
        prefix = f"mixins.{name}."
        if not any(key.startswith(prefix) for key in state):
            logger.info("%s holds no weights for LoRA mixin '%s': its adapters start from their initialisation", source, name)
            state.update(_initial_mixin_state(mixin, prefix, state))
            continue
        wrong = [
            f"{'transformer.' + k[len(prefix) :] if from_sat else k}: checkpoint {tuple(v.shape)} "
            f"vs model {tuple(expected[k].shape)}"
            for k, v in state.items()
            if k.startswith(prefix) and k in expected and v.shape != expected[k].shape
        ]
        if wrong:
            ranks = sorted({v.shape[0] for k, v in state.items() if k.startswith(prefix) and ".matrix_A." in k})
            raise CheckpointError(
                f"{source}: LoRA weights of rank {', '.join(map(str, ranks))}, but mixin '{name}' has rank {mixin.config.rank} "
                f"(model.dit.mixins.{name}.rank)" + _listing("wrong shapes", wrong)
            )
    return state


def _initial_mixin_state(mixin: nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(p.is_meta for p in mixin.parameters()):  # built on meta: a fresh initialisation in the checkpoint's dtype
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
        mixin = copy.deepcopy(mixin).to_empty(device="cpu")
        mixin.reset_parameters()
        mixin.to(dtype)
    return {prefix + k: v for k, v in mixin.state_dict().items()}


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:20])
    more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
    return f"\n  {title} ({len(items)}):\n    {shown}{more}"


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the entries of ``state`` that ``model`` takes; raise listing every missing, unexpected
    or wrongly shaped key."""
    expected = model.state_dict()
    derived = model.derived_checkpoint_keys() if hasattr(model, "derived_checkpoint_keys") else set()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in derived]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match the model"
            + (_listing("missing keys", missing) if missing else "")
            + (_listing("unexpected keys", unexpected) if unexpected else "")
            + (_listing("wrong shapes", wrong) if wrong else "")
        )
    return {k: state[k] for k in expected}


def load_checkpoint(model: nn.Module, path: str | Path, *, lora_alpha: float | None = None,
                    weights: str = "live") -> nn.Module:
    """Load DiT weights into ``model`` from a SAT run folder, an iteration folder, a ``.pt`` or a
    ``.safetensors`` file.

    Args:
        model: a model from :func:`sat_video.build_dit` (may live on the ``meta`` device; its tensors
            are then replaced by the checkpoint's).
        path: where the weights are.
        lora_alpha (`float`, *optional*): alpha of SAT LoRA weights in the checkpoint when ``model`` has no LoRA
            mixin: they are merged with scale ``lora_alpha / r`` (default 1, SAT's). A model with a LoRA mixin
            takes them into the mixin unmerged, and its config sets alpha.
        weights: ``live``, or ``ema``: the moving average of the trained weights that a run with ``train.ema`` saved
            beside them (:data:`EMA_STATES`).
    Raises:
        CheckpointError: listing every missing, unexpected or wrongly shaped key.
    """
    file = resolve_checkpoint_file(path)
    return load_dit_state(model, dit_state_dict(read_state_dict(file, weights)), source=str(file), lora_alpha=lora_alpha)


def load_dit_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint", lora_alpha: float | None = None
) -> nn.Module:
    """:func:`load_checkpoint` for a prefix-free state dict already in memory (``source`` names it in errors)."""
    state = check_state_dict(model, _place_lora(model, dict(state), source, lora_alpha), source)
    on_meta = any(t.is_meta for t in model.state_dict().values())
    if on_meta:  # a run with fp8-stored weights (model.dit.storage_dtype) saved them in fp8: assigned, they take the
        # dtype of its other weights (its compute dtype): only store_frozen_weights' linears can compute from fp8
        dtype = next((v.dtype for v in state.values() if v.is_floating_point() and v.dtype not in STORAGE_DTYPES.values()),
                     torch.float32)
        state = {k: v.to(dtype) if v.dtype in STORAGE_DTYPES.values() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


def save_checkpoint(model: nn.Module, save_dir: str | Path, iteration: int, *, overwrite: bool = False) -> Path:
    """Write ``model`` in SAT's layout as iteration ``iteration`` of ``save_dir`` and point ``latest`` at it.

    Refuses to replace an existing iteration unless ``overwrite``. Returns the weights file.
    """
    save_dir = Path(save_dir)
    file = save_dir / str(iteration) / MODEL_STATES
    if file.exists() and not overwrite:
        raise OutputExistsError(f"{file} already exists; pass overwrite=True to replace it")
    module = {SAT_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(file, lambda tmp: torch.save({"module": module, "iteration": iteration}, tmp))
    atomic_write(save_dir / "latest", lambda tmp: tmp.write_text(f"{iteration}\n"))
    return file
