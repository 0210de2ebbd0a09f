"""Process-group set-up for training, the only place that touches ``torch.distributed`` globally.

Under ``torchrun`` the rendezvous comes from its environment; under plain ``python`` a one-process group on
a free local port is created, so the same code path (DeepSpeed included) runs everywhere. GPUs use NCCL,
CPUs gloo.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sat_video.training.native_builds import prepare_native_builds


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(collective_timeout_s: float | None = None) -> DistributedEnv:
    """Join (or create) the process group and pick this process's device.

    ``collective_timeout_s``: a collective that waits longer than this raises (gloo and NCCL) instead of blocking
    for ever; ``None`` keeps torch's default. DeepSpeed starts without building ops it does not need
    (:mod:`sat_video.training.native_builds`).
    """
    import deepspeed

    if "RANK" not in os.environ:  # plain `python tools/train_video.py`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        prepare_native_builds()
        timeout = {} if collective_timeout_s is None else {"timeout": timedelta(seconds=collective_timeout_s)}
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **timeout)
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place and returned); ``values`` is moved to the backend's device type first."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        moved = values.to(device)
        dist.all_reduce(moved)
        values.copy_(moved)
    return values


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
