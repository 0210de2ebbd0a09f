"""Block offload while training (``train.offload_blocks: K``): the frozen weights of the DiT's first K blocks wait in
host memory and are copied to the device for each block's forward and again for its recomputation in backward.

It is for LoRA: only frozen weights stream. A block's own parameters must all be frozen (else it is refused); the
trainable parameters of its mixins' per-block modules (LoRA's adapters, :meth:`~sat_video.model.hooks.Mixin.block_modules`)
stay on the device, where the optimizer holds them. The streaming unit is sampling's
(:meth:`~sat_video.model.dit.DiffusionTransformer.block_groups`, :class:`~sat_video.diffusion.offload._Weights`):
while away a weight holds an empty placeholder, so a weight used without being brought in fails loudly.

Backward needs the frozen weights too (the gradient with respect to a linear's input is ``grad @ W``), so offload
requires activation checkpointing: a block's recomputation runs its forward again, whose pre-hook brings the weights
back, and they stay until the recomputation of the block below starts. By then the block's backward is finished:
autograd runs the ready node created last first, and every node of block ``i`` was created after those of block
``i - 1``. The last weights in go when the backward ends (an autograd callback).

Why the *first* K blocks: their copies in the forward start while the DiT embeds its inputs, and in backward they
come last, so block K-1's copy overlaps block K's backward. Offloading the last K would drop block L-1 at the end of
the forward only to bring it back at once for its recomputation.

On CUDA the host copies are pinned and block ``i + 1`` is copied on a side stream while block ``i`` computes; the
compute stream waits for the copy's event, and ``record_stream`` keeps a dropped block's memory from being reused
before the compute stream is done with it. On the CPU the copy is a plain copy, which makes the mechanism testable:
losses and gradients are bit-identical to no offload (``tests/training/test_block_offload.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from sat_video.common.errors import ConfigError
from sat_video.diffusion.offload import _Weights, direct_weights
from sat_video.model.build import build_dit
from sat_video.model.config import DiTConfig
from sat_video.model.dit import DiffusionTransformer
from sat_video.training.optim import select_trainable


def _outside_backward() -> bool:
    return torch._C._current_graph_task_id() == -1  # the id of the backward running on this thread, -1 if none


def _streamed_modules(members: list[nn.Module]) -> list[nn.Module]:
    """The modules of a block group whose weights stream: those holding weights, none of them trainable."""
    found = {}
    for member in members:
        for module in member.modules():
            weights = direct_weights(module)
            if weights and not any(w.requires_grad for w in weights):
                found[id(module)] = module
    return list(found.values())


def check_block_offload(dit: DiffusionTransformer, k: int, *, activation_checkpointing: bool, zero_stage: int,
                        compiled: bool = False) -> None:
    """Refuse what block offload cannot do, naming why (a :class:`ConfigError`); nothing for ``k == 0``."""
    if k == 0:
        return
    num_layers = len(dit.transformer.layers)
    problems = []
    if k > num_layers:
        problems.append(f"the DiT has {num_layers} blocks")
    if not activation_checkpointing:
        problems.append("it needs train.activation_checkpointing=true (backward needs the frozen weights again, and the "
                        "recomputation is what brings them back)")
    if zero_stage == 3:
        problems.append("ZeRO-3 already partitions every parameter and gathers each module's as it runs: use "
                        "deepspeed.zero_stage 0-2 with offload_blocks, or ZeRO-3 without it")
    if compiled:
        problems.append("train.compile=true would trace the swapped weights into its graphs; turn one off")
    for index, layer in enumerate(dit.transformer.layers[:k]):
        trained = [name for name, param in layer.named_parameters() if param.requires_grad]
        if trained:
            problems.append(f"block {index}'s parameter transformer.layers.{index}.{trained[0]} trains: offload_blocks "
                            f"streams frozen blocks only (LoRA, or a train.trainable that leaves the block weights out)")
            break
    if problems:
        raise ConfigError(f"train.offload_blocks={k}: " + "; ".join(problems))


class OffloadedBytes(NamedTuple):
    """What ``train.offload_blocks`` moves: ``host`` bytes leave the device; at most ``in_flight`` of them are back on
    it at once. Weights on the device = all weights - ``host`` + ``in_flight``."""

    host: int
    in_flight: int


def offloaded_bytes(dit: DiffusionTransformer, k: int, itemsize: int | None = None, device_type: str = "cuda") -> OffloadedBytes:
    """The bytes block offload of ``k`` blocks takes off the device, for a DiT built anywhere (``meta`` too) with its
    trainable parameters already selected. ``itemsize``: bytes per element in training (2 for bf16); ``None`` takes
    each tensor's own. ``in_flight``: one block on the CPU; on CUDA three: the one computing, the next one copying and
    the one just dropped, whose memory is reused only once the compute stream has passed it."""
    sizes = []
    for _, members in dit.block_groups()[:k]:
        tensors = {id(t): t for module in _streamed_modules(members) for t in direct_weights(module)}.values()
        sizes.append(sum(t.numel() * (itemsize or t.element_size()) for t in tensors))
    window = 1 if device_type == "cpu" else 3
    in_flight = max((sum(sizes[i:i + window]) for i in range(len(sizes))), default=0)
    return OffloadedBytes(sum(sizes), in_flight)


def device_weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as they are now (an offloaded weight's placeholder holds none)."""
    return sum(t.nbytes for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values())


class BlockOffload:
    """Streams the frozen weights of ``dit``'s first ``k`` blocks to ``device`` (hooks on the blocks); inert for 0.

    Set it up after DeepSpeed's engine has moved and cast the model; :meth:`close` puts every weight back on the device.
    """

    def __init__(self, dit: DiffusionTransformer, k: int, device: torch.device | str):
        self.dit, self.k, self.device = dit, k, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.loaded_bytes = 0
        """Bytes of offloaded weights on the device now (brought in, or being copied in)."""
        self.peak_loaded_bytes = 0
        self.groups: list[_Weights] = []
        self._loaded: dict[int, torch.cuda.Event | None] = {}  # block -> the event its copy records (None: ready)
        self._hooks: list[Any] = []
        self._backward_task = -1  # the backward whose end drops what is still in
        if k == 0:
            return
        if self.cuda:
            self._side = torch.cuda.Stream(self.device)
        hosts: dict[int, torch.Tensor] = {}
        for _, members in dit.block_groups()[:k]:
            modules = _streamed_modules(members)
            for module in modules:
                for tensor in direct_weights(module):
                    # the CPU "device" keeps the tensor as it is and brings in copies, as sampling's offload does
                    hosts.setdefault(id(tensor), tensor.detach().to("cpu").pin_memory() if self.cuda else tensor.detach())
            weights = _Weights(modules, hosts)
            weights.drop(self.device)
            self.groups.append(weights)
        for index, layer in enumerate(dit.transformer.layers):
            self._hooks.append(layer.register_forward_pre_hook(lambda *_, i=index: self._before(i)))
            if index < k:
                self._hooks.append(layer.register_forward_hook(lambda *_, i=index: self._after(i)))
        if self.cuda:  # block 0's copy overlaps the embedding
            self._hooks.append(dit.register_forward_pre_hook(lambda *_: self._prefetch(0) if _outside_backward() else None))
        self._hooks.append(dit.register_state_dict_post_hook(lambda *args: self._real_weights_in_state_dict(*args)))

    # ------------------------------------------------------------------ moving

    def _prefetch(self, index: int) -> None:
        """Start bringing block ``index`` in (a no-op for a resident block or one already in)."""
        if not 0 <= index < self.k or index in self._loaded:
            return
        weights = self.groups[index]
        if self.cuda:
            with torch.cuda.stream(self._side):
                weights._assign(lambda host: host.to(self.device, non_blocking=True))  # from pinned memory
                event = torch.cuda.Event()
                event.record(self._side)
            self._loaded[index] = event
        else:
            weights.bring_in(self.device)
            self._loaded[index] = None
        self.loaded_bytes += weights.nbytes
        self.peak_loaded_bytes = max(self.peak_loaded_bytes, self.loaded_bytes)

    def _ready(self, index: int) -> None:
        """Block ``index``'s weights are on the device for the current stream."""
        self._prefetch(index)
        event = self._loaded[index]
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for module, name, is_parameter, _ in self.groups[index].slots:
                tensor = getattr(module, name).data if is_parameter else module._buffers[name]
                tensor.record_stream(stream)  # copied on the side stream, freed only once this stream has used it
            self._loaded[index] = None

    def _drop(self, index: int) -> None:
        if self._loaded.pop(index, False) is not False:
            self.groups[index].drop(self.device)
            self.loaded_bytes -= self.groups[index].nbytes

    def _before(self, index: int) -> None:
        if torch.is_grad_enabled() and not self.dit.activation_checkpointing:
            raise ConfigError("train.offload_blocks needs activation checkpointing: a block run with gradients but without "
                              "it would keep its weights for a backward that comes after they are gone")
        if not _outside_backward():
            # the recomputation of ``index`` starts: the blocks above are done with backward
            task = torch._C._current_graph_task_id()
            if task != self._backward_task:
                self._backward_task = task
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            for above in [i for i in self._loaded if i > index]:
                self._drop(above)
            if index < self.k:
                self._ready(index)
            if self.cuda:
                self._prefetch(index - 1)
            return
        if index < self.k:
            self._ready(index)
            if self.cuda:
                self._prefetch(index + 1)

    def _after(self, index: int) -> None:
        if _outside_backward():  # a recomputation keeps the weights for the block's backward
            self._drop(index)

    def _backward_done(self) -> None:
        self._backward_task = -1
        for index in list(self._loaded):
            self._drop(index)

    # ------------------------------------------------------------------ the weights whole

    def _real_weights_in_state_dict(self, module: nn.Module, state_dict: dict, prefix: str, _metadata: Any) -> None:
        names = {id(m): name for name, m in module.named_modules()}
        for weights in self.groups:
            for owner, name, _, host in weights.slots:
                key = f"{prefix}{names[id(owner)]}.{name}"
                if key in state_dict and state_dict[key].numel() == 0:
                    state_dict[key] = host

    @contextmanager
    def on_host(self) -> Iterator[None]:
        """Inside, every offloaded parameter is its host tensor (DeepSpeed's checkpoint save and load read and write
        parameters directly); afterwards they wait off the device again."""
        if self._loaded:
            raise RuntimeError(f"blocks {sorted(self._loaded)} are still on the device (inside a forward or backward?)")
        for weights in self.groups:
            weights.restore()
        try:
            yield
        finally:
            for weights in self.groups:
                weights.drop(self.device)

    def close(self) -> None:
        """Stop offloading: hooks removed, every weight back on the device."""
        for handle in self._hooks:
            handle.remove()
        for index in list(self._loaded):
            self._drop(index)
        for weights in self.groups:
            weights.bring_in(self.device)
        self._hooks, self.groups = [], []


# ------------------------------------------------------------------ what it costs (benchmark, GPU check)


@dataclass
class OffloadStep:
    """One DiT forward + backward (activation checkpointing on) with ``k`` blocks offloaded."""

    k: int
    step_s: float
    """Median over the timed steps (after one untimed step)."""
    device_weight_bytes: int
    """Weights on the device between steps."""
    peak_loaded_bytes: int
    """The most offloaded bytes on the device at once."""
    peak_memory_bytes: int | None
    """CUDA's ``max_memory_allocated`` over the timed steps (``None`` elsewhere)."""


def measure_block_offload(dit: DiffusionTransformer, inputs: tuple, k: int, device: torch.device | str,
                          steps: int = 3) -> OffloadStep:
    """Time ``steps`` forward + backward passes of ``dit`` (on ``device``, trainable parameters selected) on ``inputs``
    (``dit``'s arguments) with ``k`` blocks offloaded; ``dit`` is left as it was, every weight on the device."""
    device = torch.device(device)
    checkpointing, dit.activation_checkpointing = dit.activation_checkpointing, True
    offload = BlockOffload(dit, k, device)
    cuda = device.type == "cuda"

    def step() -> None:
        dit(*inputs).float().square().mean().backward()
        for param in dit.parameters():
            param.grad = None
        if cuda:
            torch.cuda.synchronize(device)

    try:
        step()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return OffloadStep(k, statistics.median(times), device_weight_bytes(dit), offload.peak_loaded_bytes,
                           torch.cuda.max_memory_allocated(device) if cuda else None)
    finally:
        offload.close()
        dit.activation_checkpointing = checkpointing


def block_offload_cost(cfg, ks: tuple[int, ...], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       batch: int = 1, steps: int = 3, seed: int = 0) -> list[OffloadStep]:
    """:func:`measure_block_offload` of the DiT of ``cfg`` (a loaded config; ``train.trainable`` says what trains,
    e.g. ``configs/lora.yaml``) at its ``model.dit`` frames and latent size, for each K of ``ks``."""
    dit_config = DiTConfig.from_config(cfg)
    torch.manual_seed(seed)
    dit = build_dit(cfg)
    select_trainable(dit, list(cfg.train.trainable))
    dit.to(device, dtype)
    generator = torch.Generator().manual_seed(seed)
    frames = dit_config.latent_frames_of(dit_config.num_frames)
    frames += -frames % (dit_config.patch_size_t or 1)
    x = torch.randn(batch, frames, dit_config.in_channels, dit_config.latent_height, dit_config.latent_width, generator=generator)
    text = torch.randn(batch, dit_config.text_length, dit_config.text_hidden_size, generator=generator)
    inputs = (x.to(device, dtype), torch.full((batch,), 500, device=device), text.to(device, dtype))
    if dit_config.ofs_embed_dim:
        inputs += (2.0,)
    return [measure_block_offload(dit, inputs, k, device, steps) for k in ks]
