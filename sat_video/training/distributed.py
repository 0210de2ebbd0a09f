"""Process-group set-up for training, the only place that touches ``torch.distributed`` globally.

Under ``torchrun`` the rendezvous comes from its environment; under plain ``python`` a one-process group on
a free local port is created, so the same code path (DeepSpeed included) runs everywhere. GPUs use NCCL,
CPUs gloo.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401 - imported before any group exists: see shutdown()

from sat_video.training.native_builds import prepare_native_builds

GLOO_WORKER_THREAD = "pt_gloo_runloop"  # the name torch gives a gloo process group's worker threads


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


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the others pass anything, e.g. ``None``)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Destroy every process group, and end their threads while the interpreter can still serve them.

    Why: a gloo worker thread frees a finished collective's tensors a moment after the caller has moved on, and takes
    the GIL to do it; if the interpreter is finalizing by then, the process aborts ("terminate called without an
    active exception") at the end of a run that succeeded. A group's threads end with its last reference, so DeepSpeed's
    references are released here, and callers drop what holds groups (the engine, a model with the sequence-parallel
    mixin) before calling. ``torch.distributed.nn`` is imported with this module because its first import binds
    ``group.WORLD`` as default arguments (DeepSpeed imports it), which after the group exists would pin it for ever.
    What still holds a group after this (DeepSpeed's ZeRO-3 engine keeps itself alive through its hooks) is left to
    :func:`exit_process`.
    """
    if dist.is_initialized():
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's own references to the groups
        else:
            dist.destroy_process_group()
    gc.collect()  # groups held only by reference cycles end here, not during finalization


def exit_process(status: int) -> NoReturn:
    """End a tool's process with ``status``, skipping the interpreter's finalization while gloo threads remain.

    Everything the tool writes is closed by then; only the streams and log handlers are flushed first.
    """
    left = process_group_threads()
    if left:
        print(f"{left} gloo worker thread(s) outlived shutdown(): ending the process without interpreter finalization, "
              "where they could abort it", file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def process_group_threads() -> int:
    """How many gloo worker threads this process has (Linux; 0 where ``/proc`` cannot tell)."""
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return 0
    names = []
    for task in tasks:
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            continue
    return names.count(GLOO_WORKER_THREAD)
