"""The process layout of ``parallel.sequence_parallel_size``: W processes = D data-parallel groups x S sequence ranks.

Ranks ``[d * S, (d + 1) * S)`` form sequence group ``d`` (neighbouring ranks, so on one node for S up to the GPUs
per node: the all-to-alls stay on the fastest links). Every rank of a group trains on the same sample; the data
order, timesteps and noise follow the data-parallel rank ``d``.

:class:`SequenceParallelGroups` is also DeepSpeed's ``mpu`` (the interface of its Ulysses examples): ZeRO partitions
and reduces gradients over all W ranks and divides by D, so the sequence ranks' gradients are summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from sat_video.common.constraints import divisors
from sat_video.common.errors import ConfigError
from sat_video.model.dit import DiffusionTransformer


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits: data-parallel rank of D, sequence rank of S."""

    data_rank: int
    data_size: int
    sequence_rank: int
    sequence_size: int

    @classmethod
    def of(cls, rank: int, world_size: int, sequence_parallel_size: int) -> ParallelLayout:
        if world_size % sequence_parallel_size:
            raise ConfigError(
                f"parallel.sequence_parallel_size={sequence_parallel_size} must divide the number of processes "
                f"({world_size}): W = D x S (allowed here: {divisors(world_size)})"
            )
        return cls(rank // sequence_parallel_size, world_size // sequence_parallel_size,
                   rank % sequence_parallel_size, sequence_parallel_size)

    def describe(self) -> str:
        return f"{self.data_size} data-parallel x {self.sequence_size} sequence-parallel"


class SequenceParallelGroups:
    """The sequence groups of this job, in the shape DeepSpeed's ``mpu`` argument takes.

    Create with :meth:`initialize_sequence_parallel` after the default process group exists; every rank must call
    it (it creates one group per sequence group, collectively).
    """

    def __init__(self, layout: ParallelLayout, group: dist.ProcessGroup):
        self.layout, self.group = layout, group

    @classmethod
    def initialize_sequence_parallel(cls, sequence_parallel_size: int) -> SequenceParallelGroups:
        layout = ParallelLayout.of(dist.get_rank(), dist.get_world_size(), sequence_parallel_size)
        mine = None
        for d in range(layout.data_size):
            ranks = list(range(d * layout.sequence_size, (d + 1) * layout.sequence_size))
            group = dist.new_group(ranks)
            if d == layout.data_rank:
                mine = group
        return cls(layout, mine)

    def add_to(self, dit: DiffusionTransformer) -> None:
        """Make ``dit`` run sharded over this rank's sequence group (refused, naming the mixin, if one cannot)."""
        from mixins.sequence_parallel import SequenceParallelMixin

        dit.add_mixin("sequence_parallel", SequenceParallelMixin(dit.dit_config, self.group))

    # DeepSpeed's mpu interface ----------------------------------------------------------------------------------

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self.group

    def get_sequence_parallel_world_size(self) -> int:
        return self.layout.sequence_size

    def get_sequence_parallel_rank(self) -> int:
        return self.layout.sequence_rank

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank()

    def get_model_parallel_world_size(self) -> int:  # checkpoint file names: no tensor parallelism
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0
