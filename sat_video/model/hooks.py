"""The hook catalogue: every stage of the DiT forward pass that a mixin may take over.

A mixin is an ``nn.Module`` subclass of :class:`Mixin` that overrides some of the methods below. The
base class's bodies are never called; each method documents one hook: when it runs, what it receives,
what it must return and how several mixins implementing it compose.

Two composition kinds exist (:class:`Composition`):

* ``REPLACE``: at most one mixin replaces the stage (the default implementation, if any, lives in
  :mod:`sat_video.model.transformer`). A second replacement is a conflict and is refused when the mixin is
  added, naming both mixins. A mixin may instead *wrap* the current implementation: decorate its
  method with :func:`wraps_previous`, and it receives the implementation beneath it as ``inner=``.
  Wrappers stack in the order their mixins were added, around whatever replacement exists.
* ``CHAIN``: every mixin implementing the hook runs and receives the output of the previous one.
  They run in ascending ``chain_priority[hook]`` of their class (default 0), ties in the order the
  mixins were added; qk-LayerNorm declares -10 so that it always precedes RoPE.

All hooks receive the per-forward :class:`~sat_video.model.context.ForwardContext` as ``ctx`` and, inside
layers, the ``layer_idx``. Shapes use ``B`` batch, ``L`` condition tokens (the text plus any token an ``embed``
wrapper prepends), ``N`` video tokens, ``S = L + N``, ``D`` hidden size, ``H`` heads and ``hd`` head dim.

:data:`HOOKS` is the one written table of the hooks; :func:`hook_table_markdown` renders it for
``docs/mixins.md`` (a test fails when they drift).
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from sat_video.common.constraints import check_fields

if TYPE_CHECKING:
    from sat_video.model.config import DiTConfig
    from sat_video.model.context import ForwardContext, TokenGrid
    from sat_video.model.transformer import MLP, SelfAttention, TransformerLayer


class Composition(enum.Enum):
    REPLACE = "replace"
    CHAIN = "chain"


@dataclass(frozen=True)
class HookSpec:
    name: str
    composition: Composition
    returns: str  # what the hook returns, for the docs
    changes: str  # what a provider may change, for the docs
    default: str = "none"  # what runs when no mixin provides it
    required: bool = False  # forward refuses to run until some mixin provides it
    example: str = ""  # a shipped mixin that provides it, for error messages
    threaded_args: int = 1  # CHAIN: how many leading arguments each link returns to the next


HOOKS: tuple[HookSpec, ...] = (
    HookSpec("embed", Composition.REPLACE, "`[B, S, D]`",
             "latents `[B, T, C, H, W]` and text `[B, L, text_hidden_size]` to the token sequence, condition tokens first; "
             "tokens a wrapper prepends count as condition tokens (`ctx.num_condition_tokens` grows to match)",
             required=True, example="ImagePatchEmbedMixin"),
    HookSpec("add_position", Composition.CHAIN, "`[B, S, D]`", "absolute positions added to the embedded sequence",
             default="identity"),
    HookSpec("split_sequence", Composition.REPLACE, "`([B, L + n, D], ctx)`",
             "the part of the sequence this rank computes under sequence parallelism: the condition tokens and "
             "`ctx.shard.size` video tokens, with `ctx.shard` set", default="identity (the whole sequence)"),
    HookSpec("layer_forward", Composition.REPLACE, "`[B, S, D]`",
             "the body of block `layer_idx` (norms, modulation, residuals); call `layer.attention(...)` and "
             "`layer.mlp(...)` so that the finer hooks still apply", default="pre-LN residual block"),
    HookSpec("attention_forward", Composition.REPLACE, "`[B, S, D]`",
             "the attention stage of a block; `attention.attend(x, ctx, layer_idx, kernel=...)` runs one attention, "
             "so a mixin may run several per block", default="`attention.attend(x, ctx, layer_idx)`"),
    HookSpec("project", Composition.REPLACE, "`linear(x)` plus any change",
             "every linear inside a block; `name` is its path in the block (`attention.query_key_value`, "
             "`mlp.dense_4h_to_h`, `temporal_attention.dense`, ...)", default="`linear(x)`"),
    HookSpec("process_qkv", Composition.CHAIN, "`(q, k, v)`, each `[B, H, S, hd]`",
             "queries, keys and values after the fused projection (qk-LayerNorm, RoPE)", default="identity",
             threaded_args=3),
    HookSpec("attention_kernel", Composition.REPLACE, "`[B, H, S, hd]`", "which token attends to which, and how",
             default="SDPA, full joint attention"),
    HookSpec("mlp_forward", Composition.REPLACE, "`[B, S, D]`", "the feed-forward of a block",
             default="`dense_h_to_4h` -> GELU(tanh) -> `dense_4h_to_h`"),
    HookSpec("join_sequence", Composition.REPLACE, "`([B, S, D], ctx)`",
             "the whole sequence back from the ranks' parts, with `ctx.shard` cleared, before the output head",
             default="identity"),
    HookSpec("final_forward", Composition.REPLACE, "`[B, T, C_out, H, W]`",
             "the output head: normalised sequence to latents (video tokens only)", required=True,
             example="FinalLayerMixin"),
)


def hook_table_markdown() -> str:
    """:data:`HOOKS` as the markdown table ``docs/mixins.md`` shows, in call order."""
    rows = ["| hook | returns | what it may change | composition | default |", "|---|---|---|---|---|"]
    for spec in HOOKS:
        params = [name for name, param in inspect.signature(getattr(Mixin, spec.name)).parameters.items()
                  if name != "self" and param.kind is not param.KEYWORD_ONLY]
        composition = spec.composition.value + (", required" if spec.required else "")
        rows.append(f"| `{spec.name}({', '.join(params)})` | {spec.returns} | {spec.changes} | {composition} | {spec.default} |")
    return "\n".join(rows)


def wraps_previous(method):
    """Mark a ``REPLACE`` hook implementation as a wrapper: it is called with ``inner=`` (the
    implementation beneath it) instead of conflicting with an existing replacement."""
    method.wraps_previous = True
    return method


class Mixin(nn.Module):
    """Base class of every mixin; its hook methods below are the whole catalogue.

    Subclasses set ``Config`` (a dataclass of their own YAML parameters, validated at load time) and
    receive the model's shared sizes as ``dit_config`` instead of repeating them in their parameters.

    Args:
        dit_config (`DiTConfig`): the shared sizes of the model this mixin will be added to.
        config (`Config`, *optional*): the mixin's own parameters; defaults to ``Config()``.
    """

    @dataclass
    class Config:
        pass

    # Names (relative to the mixin) that official checkpoints store but this mixin derives itself, such
    # as RoPE frequency tables; the checkpoint loader accepts and drops them.
    derived_checkpoint_keys: ClassVar[tuple[str, ...]] = ()
    # Per CHAIN hook, where this mixin's link runs relative to others (lower runs first; default 0).
    chain_priority: ClassVar[dict[str, int]] = {}
    # Whether the hooks of this mixin are correct when a rank holds only a part of the video tokens (between
    # ``split_sequence`` and ``join_sequence``, ``ctx.shard`` set): hooks that act token by token are, hooks that
    # need the whole grid (a per-token table, attention within frames) must use ``ctx.shard`` or say False.
    # Sequence parallelism refuses a model with a mixin that does not declare True. The claim, as
    # tests/mixins/test_contract.py checks it: any rank's part of the sequence gives the rows the whole sequence gives.
    runs_sharded: ClassVar[bool] = False
    # Whether adding this mixin, freshly initialised, leaves the model's function exactly as it was (LoRA: B = 0), so
    # that it can join a trained model without changing a single output.
    identity_at_init: ClassVar[bool] = False

    def __init__(self, dit_config: DiTConfig, config: Any | None = None):
        super().__init__()
        self.dit_config = dit_config
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(
                f"{type(self).__name__} expects a {type(self).__name__}.Config, got {type(self.config).__name__}"
            )
        check_fields(self.config, f"{type(self).__name__}.Config")  # load_config checked these already

    def implemented_hooks(self) -> list[str]:
        """Hook names this mixin overrides, in catalogue order. Override to drop hooks that a config
        switches off (the hook table is rebuilt from this when the mixin is added)."""
        return [spec.name for spec in HOOKS if getattr(type(self), spec.name) is not getattr(Mixin, spec.name)]

    def reset_parameters(self) -> None:
        """Initialise this mixin's parameters as for training from scratch (no-op by default)."""

    def check_grid(self, grid: TokenGrid, num_condition_tokens: int) -> None:
        """Raise ``ValueError`` (saying why) if this mixin cannot run on inputs of ``grid``; by default any grid runs.
        The config loader asks this of every bucket of ``data.buckets`` before anything is built for real."""

    def block_modules(self, layer_idx: int) -> list[nn.Module]:
        """This mixin's modules that only block ``layer_idx`` uses; sequential offload moves them to the accelerator
        with that block and everything else of the mixin stays there throughout. By default: entry ``layer_idx`` of
        every ``nn.ModuleList`` with one entry per block (SAT's layout: ``adaLN_modulations``, LoRA's ``layers``)."""
        num_layers = self.dit_config.num_layers
        return [child[layer_idx] for child in self.children() if isinstance(child, nn.ModuleList) and len(child) == num_layers]

    # ------------------------------------------------------------------ hook catalogue

    def embed(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """REPLACE, required. Turn inputs into the token sequence.

        Args:
            x: latents ``[B, T, C, H, W]`` (I2V: image channels already concatenated).
            encoder_hidden_states: text embeddings ``[B, L, text_hidden_size]``.
        Returns:
            ``[B, L + N, D]``: text tokens first, then video tokens ordered t, h, w. Everything in front of
            the ``N`` video tokens counts as condition tokens: a wrapper may prepend more (a timestep token,
            say) and every later stage sees ``ctx.num_condition_tokens`` grown to match.
        """
        raise NotImplementedError

    def add_position(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """CHAIN. Add absolute positions to the embedded sequence ``[B, L + N, D]``; same shape out."""
        raise NotImplementedError

    def split_sequence(self, hidden: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, ForwardContext]:
        """REPLACE (default: identity). After positions, before the blocks: keep what this rank computes.

        Returns ``hidden`` ``[B, L + n, D]`` (the condition tokens, then this rank's ``n = ctx.shard.size`` video
        tokens) and the context with ``shard`` set. Provided by sequence parallelism
        (:class:`mixins.sequence_parallel.SequenceParallelMixin`).
        """
        raise NotImplementedError

    def join_sequence(self, hidden: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, ForwardContext]:
        """REPLACE (default: identity). After the final LayerNorm, before ``final_forward``: the inverse of
        ``split_sequence``, the whole ``[B, L + N, D]`` sequence and the context with ``shard`` cleared."""
        raise NotImplementedError

    def layer_forward(
        self, layer: TransformerLayer, hidden: torch.Tensor, ctx: ForwardContext, layer_idx: int
    ) -> torch.Tensor:
        """REPLACE (default: pre-LN residual block). The whole body of block ``layer_idx``.

        ``hidden`` is ``[B, L + N, D]``; return the same shape. Call ``layer.attention(x, ctx, layer_idx)``
        and ``layer.mlp(x, ctx, layer_idx)`` so that the finer hooks below still apply.
        """
        raise NotImplementedError

    def attention_forward(
        self, attention: SelfAttention, x: torch.Tensor, ctx: ForwardContext, layer_idx: int
    ) -> torch.Tensor:
        """REPLACE (default: ``attention.attend(x, ctx, layer_idx)``). The whole attention stage of block
        ``layer_idx``, ``[B, L + N, D]`` in and out (normalised input, before the residual add).

        ``attention.attend(x, ctx, layer_idx, kernel=...)`` runs projection, ``process_qkv``, a kernel
        (default: the ``attention_kernel`` hook) and the output projection; a mixin that needs several
        attentions per block (spatial and temporal, say) calls it once per attention module it owns.
        """
        raise NotImplementedError

    def project(
        self, linear: nn.Linear, x: torch.Tensor, ctx: ForwardContext, layer_idx: int, name: str
    ) -> torch.Tensor:
        """REPLACE (default: ``linear(x)``). Every linear inside a block goes through this hook; ``name`` is
        its path inside the block (``attention.query_key_value``, ``attention.dense``,
        ``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h``, or a mixin's own attention such as
        ``temporal_attention.dense``). Return ``linear(x)`` plus any change (LoRA adds a low-rank update)."""
        raise NotImplementedError

    def process_qkv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CHAIN. Transform queries, keys and values ``[B, H, L + N, hd]`` after the fused projection
        (qk-LayerNorm, RoPE, ...); return the three tensors, same shapes."""
        raise NotImplementedError

    def attention_kernel(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int
    ) -> torch.Tensor:
        """REPLACE (default: ``scaled_dot_product_attention``, full joint attention). Inputs
        ``[B, H, L + N, hd]``; return ``[B, H, L + N, hd]``."""
        raise NotImplementedError

    def mlp_forward(self, mlp: MLP, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        """REPLACE (default: ``dense_h_to_4h`` -> GELU(tanh) -> ``dense_4h_to_h``). ``[B, L + N, D]`` in and out."""
        raise NotImplementedError

    def final_forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """REPLACE, required. Map the normalised sequence ``[B, L + N, D]`` to the output
        ``[B, T, C_out, H, W]`` (video tokens only)."""
        raise NotImplementedError
