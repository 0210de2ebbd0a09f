"""LPIPS (Zhang et al. 2018, v0.1 "vgg"): the perceptual distance the VAE is trained with, defined here.

The network is torchvision's ImageNet VGG16 conv stack cut after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, plus
one learned 1x1 conv "linear head" per cut. Its module and state-dict names are those of taming's / sgm's ``LPIPS``
(``scaling_layer.*``, ``net.slice1.0.weight`` ... ``net.slice5.28.bias``, ``lin0.model.1.weight`` ...), so the copy a
SAT VAE checkpoint carries (``loss.perceptual_model.*`` in CogVideo's ``VideoAutoencoderLoss``, ``loss.perceptual_loss.*``
in sgm's ``GeneralLPIPSWithDiscriminator``) loads as it is (:func:`lpips_from_state_dict`). Otherwise the weights come
from two local files (:func:`lpips_from_files`, :data:`LPIPS_FILES_HINT`); nothing is downloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from sat_video.common.errors import CheckpointError

LPIPS_FILES_HINT = ("LPIPS needs two local files: torchvision's VGG16 weights "
                    "https://download.pytorch.org/models/vgg16-397923af.pth (vae.lpips.vgg16) and the linear heads "
                    "lpips/weights/v0.1/vgg.pth inside the wheel that `pip download lpips` fetches (vae.lpips.heads).")

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
"""torchvision's ``vgg16().features`` up to relu5_3: a number is a 3x3 conv to that many channels and its ReLU (two
indices in ``features``), ``M`` a 2x2 max pool (one index)."""
SLICE_ENDS = (4, 9, 16, 23, 30)
"""``features[0:4]`` ends at relu1_2, ``[4:9]`` at relu2_2, ... ``[23:30]`` at relu5_3."""
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 16
"""Four pools before relu5_3: smaller images have no pixel left there."""
EPS = 1e-10
STATE_PREFIXES = ("loss.perceptual_model.", "loss.perceptual_loss.", "perceptual_model.", "perceptual_loss.")
"""Where a SAT VAE checkpoint keeps LPIPS: CogVideo's loss module, sgm's, each with or without ``loss.``."""


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the statistics VGG16 was trained on."""

    def __init__(self):
        super().__init__()
        # Persistent, as in taming: SAT checkpoints carry them, and strict loading expects them.
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class VGG16Slices(nn.Module):
    """VGG16's ``features[0:30]`` as ``slice1`` ... ``slice5``; each child keeps its index in ``features``."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for entry in VGG16_LAYOUT:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                # In place as in torchvision: conv backward does not need its output, so this saves a map per layer.
                layers += [nn.Conv2d(channels, entry, 3, padding=1), nn.ReLU(inplace=True)]
                channels = entry
        for number, (start, end) in enumerate(zip((0,) + SLICE_ENDS, SLICE_ENDS), start=1):
            self.add_module(f"slice{number}", nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(start, end))))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for number in range(1, len(SLICE_ENDS) + 1):
            # Slices 2-5 start with a pool, so the in-place ReLUs never overwrite a map returned here.
            x = getattr(self, f"slice{number}")(x)
            features.append(x)
        return features


class NetLinLayer(nn.Module):
    """One linear head: a 1x1 conv from ``channels`` to one, behind a dropout (a no-op in eval mode, kept for the
    ``model.1`` name)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """The frozen LPIPS network; ``LPIPS()`` has PyTorch's default random weights, the functions below fill it."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for index, channels in enumerate(CHANNELS):
            self.add_module(f"lin{index}", NetLinLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # A parent's .train() must not switch the heads' dropout on: the loss would become random.
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance between ``x`` and ``y`` (``[B, 3, H, W]`` in [-1, 1], ``H, W >= 16``), one per image: ``[B]``."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3 or min(x.shape[2:]) < MIN_SIZE:
            raise ValueError(f"LPIPS takes two [B, 3, H, W] images with H, W >= {MIN_SIZE}, found {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        # Two passes rather than one of the concatenation: identical inputs then give exactly 0, swapped ones the same.
        features_x = self.net(self.scaling_layer(x))
        features_y = self.net(self.scaling_layer(y))
        heads = [getattr(self, f"lin{index}").model for index in range(len(CHANNELS))]
        return sum(head((_unit_channels(fx) - _unit_channels(fy)) ** 2).mean(dim=(1, 2, 3))
                   for head, fx, fy in zip(heads, features_x, features_y))


def _unit_channels(features: Tensor) -> Tensor:
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + EPS)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every state-dict name of :class:`LPIPS` and its shape."""
    with torch.device("meta"):
        return {name: tuple(tensor.shape) for name, tensor in LPIPS().state_dict().items()}


def _scaling_state() -> dict[str, Tensor]:
    return {f"scaling_layer.{name}": tensor for name, tensor in ScalingLayer().state_dict().items()}


def _check(source: str, found: Mapping[str, object], expected: Mapping[str, tuple[int, ...]], what: str,
           ignored: tuple[str, ...] = ()) -> None:
    """Raise :class:`CheckpointError` naming ``source`` and the first keys that are missing, unexpected (other than
    those starting with ``ignored``), not tensors or of the wrong shape; ``what`` says what was expected there."""
    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")

    missing = [key for key in expected if key not in found]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} LPIPS key(s) missing: {first(missing)}; expected {what}")
    unexpected = [key for key in found if key not in expected and not key.startswith(ignored)]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected key(s): {first(unexpected)}; expected {what}")
    not_tensors = [key for key in expected if not isinstance(found[key], Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: {len(not_tensors)} value(s) that are not tensors: {first(not_tensors)}")
    wrong = [f"{key}: expected shape {shape}, found {tuple(found[key].shape)}"
             for key, shape in expected.items() if tuple(found[key].shape) != shape]
    if wrong:
        raise CheckpointError(f"{source}: {len(wrong)} tensor(s) of the wrong shape: {'; '.join(wrong[:3])}")


def _build(state: Mapping[str, Tensor]) -> LPIPS:
    """An :class:`LPIPS` holding fp32 CPU copies of ``state`` (checked: every name of the module, nothing else); built
    on the meta device, so no default initialisation runs and the global RNG is untouched."""
    with torch.device("meta"):
        model = LPIPS()
    state = {name: tensor.detach().to("cpu", torch.float32, copy=True) for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _read_state_file(path: str | Path, what: str) -> tuple[str, dict[str, Tensor]]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file (expected {what}); {LPIPS_FILES_HINT}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file}: cannot be read as a weights-only torch file ({err}); expected {what}") from None
    if not isinstance(obj, dict) or not all(isinstance(key, str) and isinstance(value, Tensor) for key, value in obj.items()):
        raise CheckpointError(f"{file}: not a state dict of tensors (found {type(obj).__name__}); expected {what}")
    return str(file), obj


def lpips_from_files(vgg16: str | Path, heads: str | Path) -> LPIPS:
    """LPIPS from torchvision's ``vgg16`` ImageNet state dict (``features.N.*``; ``classifier.*`` is ignored) and the
    ``lpips`` package's ``v0.1/vgg.pth`` heads (``lin0.model.1.weight`` ...)."""
    expected = _expected_shapes()
    # net.slice3.12.weight is features.12.weight: the slices keep torchvision's indices.
    torchvision_names = {"features." + name.split(".", 2)[2]: name for name in expected if name.startswith("net.")}
    vgg_what = "torchvision's vgg16 state dict (vgg16-397923af.pth)"
    vgg_file, vgg_state = _read_state_file(vgg16, vgg_what)
    _check(vgg_file, vgg_state, {key: expected[name] for key, name in torchvision_names.items()}, vgg_what, ("classifier.",))
    heads_what = "the lpips package's lpips/weights/v0.1/vgg.pth"
    heads_file, heads_state = _read_state_file(heads, heads_what)
    _check(heads_file, heads_state, {name: shape for name, shape in expected.items() if name.startswith("lin")}, heads_what)
    state = {name: vgg_state[key] for key, name in torchvision_names.items()}
    return _build(state | heads_state | _scaling_state())


def lpips_from_state_dict(state: Mapping[str, Tensor], *, source: str = "state dict") -> LPIPS | None:
    """LPIPS from the copy in a SAT VAE state dict (keys under one of :data:`STATE_PREFIXES`; other keys are ignored),
    or None when it holds none. ``source`` names the state dict in errors (its file, say)."""
    prefixes = [prefix for prefix in STATE_PREFIXES if any(key.startswith(prefix) for key in state)]
    if not prefixes:
        return None
    if len(prefixes) > 1:
        raise CheckpointError(f"{source}: LPIPS weights under several prefixes ({', '.join(prefixes)}); expected one")
    prefix = prefixes[0]
    found = {key: value for key, value in state.items() if key.startswith(prefix)}
    expected = {prefix + name: shape for name, shape in _expected_shapes().items()}
    _check(source, found, expected, f"taming's LPIPS under {prefix}")
    return _build({key[len(prefix):]: value for key, value in found.items()})


def random_lpips(seed: int = 0) -> LPIPS:
    """LPIPS with random weights drawn from ``seed`` (the global RNG is untouched), for tests: He-scaled convs, so the
    features keep their scale through the 13 layers, and non-negative heads, as trained ones are, so distances are >= 0."""
    generator = torch.Generator().manual_seed(seed)
    state = _scaling_state()
    for name, shape in _expected_shapes().items():
        if name.startswith("net.") and name.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif name.startswith("net."):
            state[name] = torch.randn(shape, generator=generator) * 0.01
        elif name.startswith("lin"):
            state[name] = torch.rand(shape, generator=generator)
    return _build(state)
