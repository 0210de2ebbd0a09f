"""Peak bytes of live tensors on a CPU, where no allocator keeps statistics (CUDA has ``max_memory_allocated``).

:class:`LiveTensorBytes` sums the bytes of the tensor storages that operators return while it is active and that are
still alive. Scratch buffers that kernels allocate and free internally are invisible to it, and tensors made before it
started (weights) count only when an operator inside copies them.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


def _dense(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and tensor.device.type != "meta"


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by the tensors that operators return while this mode is active, current and peak.

    Storages are counted once however many views share them and leave the count when freed (their Python
    object lives exactly as long as the storage, so a weak reference finaliser sees the free).
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output sharing an input's storage (a view, an in-place op) allocated nothing, even when that input
        # existed before the mode (a parameter's transpose, a gradient accumulated in place).
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _dense(t)}
        for tensor in tree_leaves(out):
            if _dense(tensor):
                storage = tensor.untyped_storage()
                if id(storage) not in inputs and storage not in self._seen:
                    self._seen[storage] = nbytes = storage.nbytes()
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, nbytes)
        return out
