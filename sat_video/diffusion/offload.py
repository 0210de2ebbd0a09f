"""Where sampling keeps its weights (``sample.offload``): all on the accelerator, each model only while it runs, or
one block at a time.

* ``none``: T5, the DiT and the VAE stay on the accelerator together.
* ``model``: a model's weights are copied to the accelerator when its stage starts and dropped when it ends (diffusers'
  ``enable_model_cpu_offload``): the peak holds the largest model instead of all three.
* ``sequential``: the DiT's non-block weights stay for the denoising loop and each transformer block (with the mixin
  modules only it uses, :meth:`~sat_video.model.hooks.Mixin.block_modules`) is copied in just before it runs and
  dropped after; T5 and the VAE are streamed module by module (diffusers' ``enable_sequential_cpu_offload``).

Weights live in host memory throughout; while off the accelerator a parameter holds an empty placeholder (as ZeRO-3's
partitioned parameters do), so a weight used without being brought in fails loudly instead of computing elsewhere.
Copies are exact, so every mode gives the same videos bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sat_video.common.errors import UsageError

OFFLOAD_MODES = ("none", "model", "sequential")


class _Weights:
    """The tensors (parameters and buffers, not those of submodules) of a set of modules, brought in and out together."""

    def __init__(self, modules: list[nn.Module], hosts: dict[int, torch.Tensor]):
        self.slots = []  # (owner, name, is_parameter, host tensor)
        for module in modules:
            for name, param in module.named_parameters(recurse=False):
                self.slots.append((module, name, True, hosts.setdefault(id(param), param.data)))
            for name, buffer in module.named_buffers(recurse=False):
                self.slots.append((module, name, False, hosts.setdefault(id(buffer), buffer)))
        self.nbytes = sum(host.nbytes for host in {id(host): host for *_, host in self.slots}.values())

    def _assign(self, make) -> None:
        made: dict[int, torch.Tensor] = {}  # one copy of a tied weight
        for module, name, is_parameter, host in self.slots:
            if id(host) not in made:
                made[id(host)] = make(host)
            if is_parameter:
                getattr(module, name).data = made[id(host)]
            else:
                module._buffers[name] = made[id(host)]

    def bring_in(self, device: torch.device) -> None:
        self._assign(lambda host: host.to(device, copy=True))

    def drop(self, device: torch.device) -> None:
        self._assign(lambda host: torch.empty(0, dtype=host.dtype, device=device))

    def restore(self) -> None:
        self._assign(lambda host: host)


def direct_weights(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers ``module`` holds itself, not those of its submodules."""
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _modules_with_weights(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if direct_weights(m)]


def streamed_units(module: nn.Module) -> tuple[list[tuple[nn.Module, list[nn.Module]]], list[nn.Module]]:
    """How ``sequential`` splits ``module``: ``(units, resident)``. Each unit is ``(hooked, members)``: the weights of
    ``members`` are on the device only while ``hooked`` runs; ``resident`` modules' weights stay for the whole stage.
    The DiT streams its blocks (:meth:`~sat_video.model.dit.DiffusionTransformer.block_groups`), any other model
    every module that holds weights."""
    with_weights = _modules_with_weights(module)
    if not hasattr(module, "block_groups"):
        return [(m, [m]) for m in with_weights], []
    units = [(hooked, [m for member in members for m in _modules_with_weights(member)])
             for hooked, members in module.block_groups()]
    streamed = {id(m) for _, members in units for m in members}
    return units, [m for m in with_weights if id(m) not in streamed]


class WeightPlacement:
    """Moves the weights of sampling's models to ``device`` as ``mode`` says; :meth:`running` brackets a stage.

    Args:
        mode (`str`): one of :data:`OFFLOAD_MODES`.
        device (`torch.device`): where the models compute.
    """

    def __init__(self, mode: str, device: torch.device | str):
        if mode not in OFFLOAD_MODES:
            raise UsageError(f"sample.offload: expected one of {', '.join(OFFLOAD_MODES)}, found {mode!r}")
        self.mode, self.device = mode, torch.device(device)
        self._stage_weights: dict[str, _Weights] = {}  # brought in for the whole stage
        self._all: list[_Weights] = []
        self._hooks = []
        self._hosts: dict[int, torch.Tensor] = {}  # a tied weight (T5's shared embedding) has one host tensor
        self.loaded_bytes = 0
        """Bytes of managed weights on ``device`` now (every weight, for ``none``)."""

    def add(self, name: str, module: nn.Module) -> nn.Module:
        """Manage ``module`` (on the host, in its sampling dtype) as the model of stage ``name``; returns it."""
        if self.mode == "none":
            weights = _Weights(_modules_with_weights(module), {})
            if any(host.device != self.device for *_, host in weights.slots):
                module.to(self.device)
            self.loaded_bytes += weights.nbytes
            return module
        if self.mode == "model":
            self._stage_weights[name] = self._managed(_modules_with_weights(module))
            return module
        units, resident = streamed_units(module)
        for hooked, members in units:
            self._stream(hooked, self._managed(members))
        self._stage_weights[name] = self._managed(resident)
        return module

    def _managed(self, modules: list[nn.Module]) -> _Weights:
        weights = _Weights(modules, self._hosts)
        weights.drop(self.device)
        self._all.append(weights)
        return weights

    def _bring_in(self, weights: _Weights) -> None:
        weights.bring_in(self.device)
        self.loaded_bytes += weights.nbytes

    def _drop(self, weights: _Weights) -> None:
        weights.drop(self.device)
        self.loaded_bytes -= weights.nbytes

    def _stream(self, module: nn.Module, weights: _Weights) -> None:
        self._hooks.append(module.register_forward_pre_hook(lambda *_: self._bring_in(weights)))
        self._hooks.append(module.register_forward_hook(lambda *_: self._drop(weights)))

    @contextmanager
    def running(self, name: str) -> Iterator[None]:
        """The model of stage ``name`` may compute inside this block (a no-op for ``none``)."""
        weights = self._stage_weights.get(name)
        if weights is None:
            yield
            return
        self._bring_in(weights)
        try:
            yield
        finally:
            self._drop(weights)

    def close(self) -> None:
        """Stop managing: hooks removed, every weight back to its host tensor."""
        for handle in self._hooks:
            handle.remove()
        for weights in self._all:
            weights.restore()
        self._hooks, self._all, self._stage_weights = [], [], {}
