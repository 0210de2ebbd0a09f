"""Read and write DiT weights in SAT's checkpoint layout.

Layout: ``<dir>/latest`` holds the iteration; ``<dir>/<iteration>/mp_rank_00_model_states.pt`` holds
``{"module": state_dict}`` with keys prefixed ``model.diffusion_model.``. Official checkpoints also
carry ``conditioner.*`` (T5) and ``first_stage_model.*`` (VAE), which the DiT ignores, and a few
entries the model derives itself (RoPE tables, the 2B sin-cos table), which are accepted by name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from .sat_lora import has_sat_lora, merge_sat_lora

SAT_PREFIX = "model.diffusion_model."
IGNORED_PREFIXES = ("conditioner.", "first_stage_model.")
MODEL_STATES = "mp_rank_00_model_states.pt"


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read, or does not fit the model."""


def resolve_checkpoint_file(path: Union[str, Path]) -> Path:
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


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Load the raw state dict (``module`` of a SAT file, a plain ``.pt`` state dict, or ``.safetensors``)."""
    file = resolve_checkpoint_file(path)
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


def dit_state_dict(raw: dict[str, torch.Tensor], lora_alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Strip ``model.diffusion_model.``, drop T5 / VAE entries and merge SAT LoRA weights."""
    state = {}
    for key, value in raw.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        state[key[len(SAT_PREFIX):] if key.startswith(SAT_PREFIX) else key] = value
    return merge_sat_lora(state, lora_alpha) if has_sat_lora(state) else state


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
        for k in state if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match the model"
            + (_listing("missing keys", missing) if missing else "")
            + (_listing("unexpected keys", unexpected) if unexpected else "")
            + (_listing("wrong shapes", wrong) if wrong else "")
        )
    return {k: state[k] for k in expected}


def load_checkpoint(model: nn.Module, path: Union[str, Path], *, lora_alpha: float = 1.0) -> nn.Module:
    """Load DiT weights into ``model`` from a SAT run folder, an iteration folder, a ``.pt`` or a
    ``.safetensors`` file.

    Args:
        model: a model from :func:`sat_video.build_dit` (may live on the ``meta`` device; its tensors
            are then replaced by the checkpoint's).
        path: where the weights are.
        lora_alpha: SAT LoRA weights found in the checkpoint are merged with scale ``lora_alpha / r``.
    Raises:
        CheckpointError: listing every missing, unexpected or wrongly shaped key.
    """
    file = resolve_checkpoint_file(path)
    state = check_state_dict(model, dit_state_dict(read_state_dict(file), lora_alpha), str(file))
    on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


def atomic_write(path: Path, write: Callable[[Path], None], *, suffix: str = ".tmp") -> None:
    """Write through a temporary file in the same folder, then rename: readers see old or new, never half.

    ``write`` receives the temporary path; ``suffix`` is its extension (writers such as ffmpeg pick the format by it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions of a normal write
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(model: nn.Module, save_dir: Union[str, Path], iteration: int, *, overwrite: bool = False) -> Path:
    """Write ``model`` in SAT's layout as iteration ``iteration`` of ``save_dir`` and point ``latest`` at it.

    Refuses to replace an existing iteration unless ``overwrite``. Returns the weights file.
    """
    save_dir = Path(save_dir)
    file = save_dir / str(iteration) / MODEL_STATES
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file} already exists; pass overwrite=True to replace it")
    module = {SAT_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(file, lambda tmp: torch.save({"module": module, "iteration": iteration}, tmp))
    atomic_write(save_dir / "latest", lambda tmp: tmp.write_text(f"{iteration}\n"))
    return file
