"""SequenceParallelMixin: DeepSpeed-Ulysses sequence parallelism, the video tokens split across S ranks.

Every rank of a sequence-parallel group runs the same sample. After positions are added (``split_sequence``),
each keeps the text tokens and 1/S of the video tokens (the last rank's part padded when S does not divide N);
blocks then run token by token on that part, except attention:

1. q, k, v of the video tokens go through DeepSpeed's Ulysses all-to-all: sequence-sharded, all heads ->
   the whole video, H/S heads (:class:`deepspeed.sequence.layer.DistributedAttention`).
2. Each rank already holds the text's q, k, v for every head and takes its own H/S heads, so the text is
   attended once in all (not S times), by the rank owning each head.
3. The wrapped kernel (SDPA, or whatever mixin replaces ``attention_kernel``) runs full joint attention of
   text + video for those heads; padding rows are dropped first, so nothing ever attends to them.
4. The output all-to-all sends each rank its video tokens for all heads *and*, in the same exchange, every
   rank's heads of the text output: each rank ends the block with the whole, exact text hidden state that
   expert AdaLN and later blocks need, without a separate all-gather.

Before the output head (``join_sequence``) the video tokens are all-gathered once (``[B, N, D]``, the size of
one all-to-all of a single projection), so the output head, the loss and every ``final_forward`` mixin run
unchanged on the whole latent; each rank then holds the same prediction.

Gradients: every collective above has its adjoint as backward, so the sum over a group of the ranks'
parameter gradients is the gradient of the sum of their (identical) losses. A trainer therefore backpropagates
``loss / S`` and lets DeepSpeed sum gradients over the sequence-parallel group (which it does when given
:class:`sat_video.training.sequence_parallel.SequenceParallelGroups` as ``mpu``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sat_video.common.constraints import divisors
from sat_video.common.errors import ConfigError
from sat_video.model.context import ForwardContext, SequenceShard
from sat_video.model.hooks import Mixin, wraps_previous


class SequenceParallelMixin(Mixin):
    """Split the video tokens over ``group`` (``split_sequence``, ``join_sequence``) and run attention with Ulysses
    all-to-alls (an ``attention_kernel`` wrapper). No parameters: checkpoints are unchanged.

    Args:
        group: the sequence-parallel process group of this rank (its size S must divide the head count).
    """

    runs_sharded = True

    def __init__(self, dit_config, group: dist.ProcessGroup):
        super().__init__(dit_config)
        from deepspeed.sequence.layer import DistributedAttention

        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if dit_config.num_attention_heads % self.world_size:
            raise ConfigError(
                f"parallel.sequence_parallel_size={self.world_size} must divide the {dit_config.num_attention_heads} "
                f"attention heads (allowed: {divisors(dit_config.num_attention_heads)})"
            )
        # Batch-first [B, s, H, hd]: the input exchange scatters heads (dim 2) and gathers the sequence (dim 1).
        self.ulysses = DistributedAttention(self._local_attention, group, scatter_idx=2, gather_idx=1)

    def split_sequence(self, hidden: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, ForwardContext]:
        n = ctx.num_condition_tokens
        shard = SequenceShard(self.rank, self.world_size, hidden.shape[1] - n)
        video = hidden[:, n + shard.start : n + shard.start + shard.size]
        video = F.pad(video, (0, 0, 0, shard.size - video.shape[1]))  # the last ranks' padding rows
        return torch.cat([hidden[:, :n], video], dim=1), dataclasses.replace(ctx, shard=shard)

    def join_sequence(self, hidden: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, ForwardContext]:
        n, shard = ctx.num_condition_tokens, ctx.shard
        video = _GatherSequence.apply(hidden[:, n:], self.group)[:, : shard.num_tokens]
        return torch.cat([hidden[:, :n], video], dim=1), dataclasses.replace(ctx, shard=None)

    @wraps_previous
    def attention_kernel(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int, *,
        inner: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        n, heads = ctx.num_condition_tokens, q.shape[1] // self.world_size
        own_heads = slice(self.rank * heads, (self.rank + 1) * heads)
        text = [t[:, own_heads, :n] for t in (q, k, v)]  # [B, H/S, L, hd]
        video = [t[:, :, n:].transpose(1, 2) for t in (q, k, v)]  # [B, N/S, H, hd]
        out = self.ulysses(*video, 0, None, text, ctx, layer_idx, inner)  # [B, N/S + L, H, hd]
        size = ctx.shard.size
        return torch.cat([out[:, size:], out[:, :size]], dim=1).transpose(1, 2)  # [B, H, L + N/S, hd]

    def _local_attention(self, q_video, k_video, v_video, text, ctx: ForwardContext, layer_idx: int, inner) -> torch.Tensor:
        """Between the exchanges: ``[B, S * size, H/S, hd]`` video (padded) plus this rank's text heads -> what the
        output exchange sends, ``[B, S * (size + L), H/S, hd]``: for each destination rank its video rows, then the text."""
        shard, n = ctx.shard, ctx.num_condition_tokens
        q, k, v = (torch.cat([t, x[:, : shard.num_tokens].transpose(1, 2)], dim=2)
                   for t, x in zip(text, (q_video, k_video, v_video)))  # [B, H/S, L + N, hd], padding dropped
        out = inner(q, k, v, dataclasses.replace(ctx, shard=None), layer_idx).transpose(1, 2)  # [B, L + N, H/S, hd]
        video = F.pad(out[:, n:], (0, 0, 0, 0, 0, shard.world_size * shard.size - shard.num_tokens))
        video = video.unflatten(1, (shard.world_size, shard.size))  # [B, S, size, H/S, hd]
        text_out = out[:, None, :n].expand(-1, shard.world_size, -1, -1, -1)  # the same text to every rank
        return torch.cat([video, text_out], dim=2).flatten(1, 2)


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence; backward hands each rank the sum over ranks of its part's gradient (the adjoint,
    as an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, part: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.size = group, part.shape[1]
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, part.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.size
        return grad[:, start : start + ctx.size], None
