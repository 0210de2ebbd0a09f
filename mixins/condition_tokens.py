"""ConditionTokensMixin: Latte's "all tokens" conditioning, the timestep as a token of the sequence.

An ``embed`` wrapper projects the timestep embedding ``ctx.temb`` (timestep, plus ofs where the model has an
ofs embedding) to one token and puts it in front of the sequence: ``[timestep | text | video]``. The model
then counts it as a condition token (``ctx.num_condition_tokens`` grows by one), so positions, attention and the output
head treat it like the text.

Used instead of expert AdaLN: the config drops the AdaLN mixin, so blocks run the plain pre-LN default and
the timestep reaches the video only through attention. To change the conditioning and nothing else, it adds
``qk_layernorm`` (which the AdaLN mixin carried) and keeps ``final_layer``, whose output head still applies
one timestep shift and scale. Latte's released code has only the S-AdaLN model, whose head modulates the
same way; the paper describes the all-tokens variant as conditions given as tokens and does not say what its
head does, so the head stays the same in both variants::

    model:
      dit:
        mixins:
          adaln_layer: null
          qk_norm: {type: qk_layernorm}
          timestep_token: {type: condition_tokens}
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sat_video.model.context import ForwardContext
from sat_video.model.hooks import Mixin, wraps_previous
from sat_video.model.registry import register_mixin


@register_mixin("condition_tokens")
class ConditionTokensMixin(Mixin):
    """A timestep token prepended to the sequence (``embed`` wrapper).

    State dict: ``time_proj.{weight,bias}`` ``[D, time_embed_dim]``.
    """

    runs_sharded = True  # embedding runs before split_sequence

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        self.time_proj = nn.Linear(dit_config.time_embed_dim, dit_config.hidden_size)

    def reset_parameters(self) -> None:
        self.time_proj.reset_parameters()

    @wraps_previous
    def embed(
        self, x: torch.Tensor, encoder_hidden_states: torch.Tensor, ctx: ForwardContext, *, inner: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        hidden = inner(x, encoder_hidden_states, ctx)  # [B, L + N, D]
        time_token = self.time_proj(ctx.temb)[:, None]  # [B, 1, D]
        return torch.cat([time_token.to(hidden.dtype), hidden], dim=1)  # [B, 1 + L + N, D]
