"""LoRAMixin: low-rank adapters on the block linears, in SAT's layout, without touching the base weights.

Each adapted linear ``W`` (``[out, in]``, its output split in ``P`` partitions: 3 for the fused
``query_key_value``, 1 otherwise) gets ``matrix_A.{p}`` ``[rank, in]`` and ``matrix_B.{p}`` ``[out / P, rank]``:

    y = W x + b + (alpha / rank) * concat_p(B_p A_p x)

as SAT's ``LoraMixin`` (``sat.model.finetune.lora2``): A Kaiming-uniform, B zero (the model starts unchanged),
scale ``alpha / rank`` with SAT's alpha 1 by default. Unlike SAT, which swaps the linear for a wrapper (so the
base weight moves to ``...query_key_value.original.weight``), the adapters hook into the ``project`` stage
and live under the mixin; base checkpoints load as they are, SAT LoRA checkpoints are renamed on load
(:mod:`sat_video.formats.sat_lora`), and ``tools/convert_to_diffusers.py`` merges the adapters or exports them in
diffusers' LoRA format.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sat_video.common.errors import ConfigError
from sat_video.model.context import ForwardContext
from sat_video.model.hooks import Mixin, wraps_previous
from sat_video.model.registry import register_mixin

# (in, out) of each target as multiples of the hidden size (the MLP is 4x wide, see sat_video/model/transformer.py),
# and its output partitions (SAT adapts q, k and v of the fused projection with one matrix pair each).
_SHAPES = {
    "attention.query_key_value": (1, 3, 3),
    "attention.dense": (1, 1, 1),
    "mlp.dense_h_to_4h": (1, 4, 1),
    "mlp.dense_4h_to_h": (4, 1, 1),
}


class LoRAAdapter(nn.Module):
    """The low-rank update of one linear: ``matrix_A.{p}`` ``[rank, in]``, ``matrix_B.{p}`` ``[out / parts, rank]``."""

    def __init__(self, in_features: int, out_features: int, parts: int, rank: int):
        super().__init__()
        self.matrix_A = nn.ParameterList(nn.Parameter(torch.empty(rank, in_features)) for _ in range(parts))
        self.matrix_B = nn.ParameterList(nn.Parameter(torch.empty(out_features // parts, rank)) for _ in range(parts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lora_a, lora_b in zip(self.matrix_A, self.matrix_B):
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            nn.init.zeros_(lora_b)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale * concat_p(B_p A_p x)``: ``[..., in]`` -> ``[..., out]``, never forming ``B A``."""
        # one pass over x for all partitions: [..., parts * rank]
        hidden = F.linear(x, torch.cat(list(self.matrix_A)) if len(self.matrix_A) > 1 else self.matrix_A[0]) * scale
        chunks = hidden.chunk(len(self.matrix_B), dim=-1)
        return torch.cat([F.linear(chunk, lora_b) for chunk, lora_b in zip(chunks, self.matrix_B)], dim=-1)


LORA_TARGETS = tuple(_SHAPES)
"""Block linears an adapter may wrap (names of the ``project`` hook)."""
SAT_TARGETS = LORA_TARGETS[:2]
"""What SAT's CogVideoX LoRA wraps."""

@register_mixin("lora")
class LoRAMixin(Mixin):
    """LoRA on the block linears named in ``targets``, in every layer (``project`` hook, wraps other mixins').

    State dict: ``layers.{i}.<target>.matrix_A.{p}`` / ``matrix_B.{p}``, e.g.
    ``mixins.lora.layers.3.attention.query_key_value.matrix_A.0`` (partitions q, k, v of the fused projection).
    Train only these with ``train.trainable: ["mixins.lora.*"]`` (``configs/lora.yaml``).
    """

    runs_sharded = True  # token by token
    identity_at_init = True  # B = 0: every update starts at zero

    @dataclass
    class Config:
        rank: int = 128
        """Rank ``r`` of every adapter (SAT's CogVideoX LoRA: 128 for 2B, 256 for 5B)."""
        alpha: float = 1.0
        """The update is scaled by ``alpha / rank`` (SAT's alpha is 1, so its scale is ``1 / rank``)."""
        targets: list[str] = field(default_factory=lambda: list(SAT_TARGETS))
        """Block linears to adapt: ``attention.query_key_value`` and ``attention.dense`` (SAT's choice, so SAT LoRA
        checkpoints load), optionally ``mlp.dense_h_to_4h`` and ``mlp.dense_4h_to_h``."""
        dropout: float = 0.0
        """Dropout on the adapters' input while training (the base linear sees the undropped input)."""

        def __post_init__(self):
            problems = []
            if self.rank <= 0:
                problems.append(f"rank must be positive, found {self.rank}")
            if self.alpha <= 0:
                problems.append(f"alpha must be positive, found {self.alpha}")
            unknown = [t for t in self.targets if t not in LORA_TARGETS]
            if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
                problems.append(f"targets must be distinct names out of {list(LORA_TARGETS)}, found {list(self.targets)}")
            if not 0.0 <= self.dropout < 1.0:
                problems.append(f"dropout must lie in [0, 1), found {self.dropout}")
            if problems:
                raise ConfigError("lora mixin: " + "; ".join(problems))

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        self.scale = self.config.alpha / self.config.rank
        self.dropout = nn.Dropout(self.config.dropout) if self.config.dropout else nn.Identity()
        self.targets = frozenset(self.config.targets)
        width = dit_config.hidden_size

        def layer_adapters() -> nn.ModuleDict:
            # nested by the target's path so that keys read layers.{i}.attention.query_key_value.matrix_A.{p}
            groups: dict[str, nn.ModuleDict] = {}
            for target in self.config.targets:
                group, linear = target.split(".")
                fan_in, fan_out, partitions = _SHAPES[target]
                adapter = LoRAAdapter(fan_in * width, fan_out * width, partitions, self.config.rank)
                groups.setdefault(group, nn.ModuleDict())[linear] = adapter
            return nn.ModuleDict(groups)

        self.layers = nn.ModuleList(layer_adapters() for _ in range(dit_config.num_layers))

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, LoRAAdapter):
                module.reset_parameters()

    @wraps_previous
    def project(
        self,
        linear: nn.Linear,
        x: torch.Tensor,
        ctx: ForwardContext,
        layer_idx: int,
        name: str,
        *,
        inner: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        out = inner(linear, x, ctx, layer_idx, name)
        if name not in self.targets:
            return out
        group, target = name.split(".")
        return out + self.layers[layer_idx][group][target](self.dropout(x), self.scale)
