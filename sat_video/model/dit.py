"""The diffusion transformer: the bare base plus timestep embeddings, with its stages taken over by mixins.

Construction only allocates modules: no process group, no global seeding, no device probing, so a
model can be built on CPU or under ``torch.device("meta")``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.utils.checkpoint
from torch import nn

from sat_video.model.composition import HookTable
from sat_video.model.config import DiTConfig
from sat_video.model.context import ForwardContext
from sat_video.model.hooks import Mixin
from sat_video.model.transformer import DEFAULT_HOOKS, BaseTransformer

# Present in official RoPE checkpoints but never used by the model (SAT allocates it by default).
UNUSED_CHECKPOINT_KEYS = ("transformer.position_embeddings.weight",)

# Fused attention kernels (every device's SDPA backend). Their outputs are what activation checkpointing keeps
# when ``checkpoint_keeps_attention`` is on: the attention forward kernel is the costliest op to recompute.
_ATTENTION_KERNELS = tuple(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)
)


def _keep_attention_outputs(ctx, op, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy:
    policy = torch.utils.checkpoint.CheckpointPolicy
    return policy.MUST_SAVE if op in _ATTENTION_KERNELS else policy.PREFER_RECOMPUTE


def _keep_attention_contexts():
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(_keep_attention_outputs)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` ordered [cos | sin], frequencies ``exp(-ln(max_period) i / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _mlp_embedding(in_dim: int, out_dim: int) -> nn.Sequential:
    # Indices 0 and 2 are the checkpoint names (time_embed.0 / time_embed.2).
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


def _sizes(dit_config: DiTConfig) -> dict:
    return {
        f.name: getattr(dit_config, f.name) for f in dataclasses.fields(dit_config) if f.name not in ("mixins", "mixin_modules")
    }


class DiffusionTransformer(nn.Module):
    """SAT-compatible video DiT.

    Args:
        dit_config (`DiTConfig`): shared sizes; mixins added later must be built with the same sizes.

    Use :func:`sat_video.build_dit` to build one with the mixins a config lists, or call
    :meth:`add_mixin` yourself.
    """

    def __init__(self, dit_config: DiTConfig):
        super().__init__()
        self.dit_config = dit_config
        # 1. timestep (and ofs) embedding
        self.time_embed = _mlp_embedding(dit_config.hidden_size, dit_config.time_embed_dim)
        self.ofs_embed = _mlp_embedding(dit_config.ofs_embed_dim, dit_config.ofs_embed_dim) if dit_config.ofs_embed_dim else None
        # 2. transformer blocks
        self.transformer = BaseTransformer(dit_config.hidden_size, dit_config.num_layers, dit_config.num_attention_heads)
        self.transformer.reset_parameters()
        # 3. mixins: embeddings, positions, modulation, output head, ...
        self.mixins = nn.ModuleDict()
        self._hooks = HookTable.build({}, DEFAULT_HOOKS)
        self.activation_checkpointing = False
        """Recompute each block in backward instead of keeping its activations (training memory)."""
        self.checkpoint_keeps_attention = True
        """With checkpointing, keep each block's attention-kernel outputs (``[B, N, D]`` and the softmax
        statistics per block), so that backward recomputes everything but the attention forward kernel."""

    # ------------------------------------------------------------------ mixin management

    def add_mixin(self, name: str, mixin: Mixin) -> None:
        """Add ``mixin`` under ``mixins.<name>``. Composition is checked first: on any error (name taken,
        sizes differ, a hook conflict) the model is left exactly as it was."""
        if not isinstance(mixin, Mixin):
            raise TypeError(f"add_mixin('{name}'): expected a Mixin, got {type(mixin).__name__}")
        if not name.isidentifier():
            raise ValueError(f"mixin name '{name}' must be a Python identifier (it becomes the state-dict prefix)")
        if name in self.mixins:
            raise ValueError(f"a mixin named '{name}' ({type(self.mixins[name]).__name__}) is already added; del_mixin it first")
        ours, theirs = _sizes(self.dit_config), _sizes(mixin.dit_config)
        if ours != theirs:
            diff = {k: (v, theirs[k]) for k, v in ours.items() if theirs[k] != v}
            raise ValueError(f"mixin '{name}' was built for other sizes (model vs mixin): {diff}")
        table = HookTable.build({**self.mixins, name: mixin}, DEFAULT_HOOKS)
        self.mixins[name] = mixin
        self._hooks = table

    def del_mixin(self, name: str) -> Mixin:
        """Remove and return the mixin ``name``; its hooks fall back to what lies beneath."""
        if name not in self.mixins:
            raise KeyError(f"no mixin named '{name}'; present: {list(self.mixins)}")
        remaining = {k: m for k, m in self.mixins.items() if k != name}
        table = HookTable.build(remaining, DEFAULT_HOOKS)
        mixin = self.mixins.pop(name)
        self._hooks = table
        return mixin

    @property
    def hook_origins(self) -> dict[str, list[str]]:
        """For each hook, the contributors in call-nesting order (``default``, mixin names)."""
        return dict(self._hooks.origins)

    def describe_hooks(self) -> str:
        return self._hooks.describe()

    def reset_parameters(self) -> None:
        """Re-initialise everything as for training from scratch."""
        for module in (self.time_embed, self.ofs_embed):
            if module is not None:
                for layer in module:
                    if isinstance(layer, nn.Linear):
                        layer.reset_parameters()
        self.transformer.reset_parameters()
        for mixin in self.mixins.values():
            mixin.reset_parameters()

    def compile_blocks(self) -> None:
        """``torch.compile`` every transformer block (inductor), inside activation checkpointing if that is on.

        Raises dynamo's process-wide recompile limit to four graphs per block: blocks share one ``forward`` code
        object but index their mixins' per-layer modules by ``layer_idx``, so each block is a graph of its own,
        and again per autocast state and for other input shapes (validation sampling).
        """
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(self.transformer.layers))
        for layer in self.transformer.layers:
            layer.compile()

    def block_groups(self) -> list[tuple[nn.Module, list[nn.Module]]]:
        """Per transformer block: the block and every module only it uses (its own, its mixins' per-block modules),
        which sequential offload brings to the accelerator just before the block runs."""
        return [(layer, [layer, *(module for mixin in self.mixins.values() for module in mixin.block_modules(index))])
                for index, layer in enumerate(self.transformer.layers)]

    def derived_checkpoint_keys(self) -> set[str]:
        """Entries that official checkpoints hold but this model derives or never uses."""
        keys = set(UNUSED_CHECKPOINT_KEYS)
        for name, mixin in self.mixins.items():
            keys.update(f"mixins.{name}.{key}" for key in mixin.derived_checkpoint_keys)
        return keys

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        ofs: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Predict from noisy latents.

        Args:
            x (`torch.Tensor`): latents ``[B, T, C, H, W]`` (I2V: the image-condition channels already
                concatenated after the noisy ones).
            timesteps (`torch.Tensor` or number): DDPM step index per sample, ``[B]`` or a scalar.
            encoder_hidden_states (`torch.Tensor`): text embeddings ``[B, L, text_hidden_size]``.
            ofs (`torch.Tensor` or number, *optional*): required by models with an ofs embedding
                (CogVideoX 1.5 I2V uses 2.0).
        Returns:
            ``[B, T, out_channels, H, W]``.
        """
        dit_config = self.dit_config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, T, C, H, W], got shape {tuple(x.shape)}")
        batch, frames, _, height, width = x.shape
        patch_t = dit_config.patch_size_t or 1
        if height % dit_config.patch_size or width % dit_config.patch_size or frames % patch_t:
            raise ValueError(
                f"latent frames x height x width {frames}x{height}x{width} must be divisible by "
                f"patch sizes {patch_t}x{dit_config.patch_size}x{dit_config.patch_size}"
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"encoder_hidden_states must be [B={batch}, L, {dit_config.text_hidden_size}], "
                f"got shape {tuple(encoder_hidden_states.shape)}"
            )
        grid = dit_config.latent_token_grid(frames, height, width)

        # 1. conditioning embedding
        emb_dtype = self.time_embed[0].weight.dtype
        temb = self.time_embed(timestep_embedding(_per_sample(timesteps, batch, x.device), dit_config.hidden_size).to(emb_dtype))
        if self.ofs_embed is not None:
            if ofs is None:
                raise ValueError("this model has an ofs embedding (CogVideoX 1.5 I2V): pass ofs, e.g. ofs=2.0")
            ofs = _per_sample(ofs, batch, x.device)
            temb = temb + self.ofs_embed(timestep_embedding(ofs, dit_config.ofs_embed_dim).to(emb_dtype))
        hooks = self._hooks
        ctx = ForwardContext(temb=temb, num_condition_tokens=encoder_hidden_states.shape[1], grid=grid, hooks=hooks, ofs=ofs)

        # 2. tokens: [B, L + N, D], text first
        hidden = hooks.embed(x, encoder_hidden_states, ctx)
        condition_tokens = hidden.shape[1] - grid.num_tokens
        if condition_tokens < 0:
            raise ValueError(
                f"embed returned {hidden.shape[1]} tokens, fewer than the {grid.num_tokens} video tokens of grid {grid}"
            )
        if condition_tokens != ctx.num_condition_tokens:  # a mixin prepended condition tokens of its own
            ctx = dataclasses.replace(ctx, num_condition_tokens=condition_tokens)
        hidden = hooks.add_position(hidden, ctx)
        hidden, ctx = hooks.split_sequence(hidden, ctx)  # sequence parallelism: this rank's part

        # 3. blocks
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        if checkpointing:
            contexts = _keep_attention_contexts if self.checkpoint_keeps_attention else torch.utils.checkpoint.noop_context_fn
            checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False, context_fn=contexts)
        for layer_idx, layer in enumerate(self.transformer.layers):
            if checkpointing:
                hidden = checkpoint(layer, hidden, ctx, layer_idx)
            else:
                hidden = layer(hidden, ctx, layer_idx)
        hidden = self.transformer.final_layernorm(hidden)
        hidden, ctx = hooks.join_sequence(hidden, ctx)

        # 4. output head: [B, T, C_out, H, W]
        return hooks.final_forward(hidden, ctx)


def _per_sample(values: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
    values = torch.as_tensor(values, device=device)
    if values.ndim == 0:
        values = values.expand(batch)
    if values.shape != (batch,):
        raise ValueError(f"expected a scalar or a [B={batch}] tensor, got shape {tuple(values.shape)}")
    return values
