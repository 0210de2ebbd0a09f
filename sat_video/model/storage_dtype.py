"""fp8-stored frozen weights (``model.dit.storage_dtype``): the attention and MLP linears of a LoRA run keep their
weights in ``float8_e4m3fn`` or ``float8_e5m2`` and upcast them to the compute dtype just before each matmul.

Stored in fp8 (refused if any trains): the weight, not the bias, of every ``nn.Linear`` of a :class:`SelfAttention` or
:class:`MLP`, that is ``attention.query_key_value``, ``attention.dense``, ``mlp.dense_h_to_4h`` and ``mlp.dense_4h_to_h``
of each block, and a mixin's own attentions built from ``SelfAttention`` (``factorized_attention``'s temporal
attention). They are 85% (CogVideoX-5B) to 78% (2B) of the DiT's weights.

Kept in the compute dtype, and why:

* every LayerNorm (``input_layernorm``, ``post_attention_layernorm``, ``final_layernorm``, qk-LayerNorm): norms;
* ``time_embed``, ``ofs_embed``, the patch and text projections (``image_patch_embed``), ``condition_tokens``'
  ``time_proj`` and learned position tables: embeddings, each read once per forward;
* the AdaLN modulations (``adaln``'s ``adaLN_modulations``, the output head's ``adaLN_modulation``): their shift,
  scale and gate multiply every token of the residual stream alike, so a rounding error does not average out over
  tokens; diffusers' default skip list keeps them too (they are ``norm1.linear`` / ``norm2.linear`` there);
* the output head's ``linear`` (diffusers' ``proj_out``, skipped there as well);
* LoRA's factors and anything else that trains: they are trained in the compute dtype.

As diffusers' ``apply_layerwise_casting``, the weight is cast without a scale, so values below fp8's range flush to
zero: ``float8_e4m3fn`` (3 mantissa bits, smallest normal 2^-6) loses most of a weight of std 0.002, ``float8_e5m2``
(2 bits, smallest normal 2^-14) keeps the same relative error (about 5%) at any scale (docs/lora_and_i2v.md).
Diffusers' hooks do not fit: their skip patterns are diffusers' names (``norm`` would not keep SAT's
``adaLN_modulations``), and they swap the parameters' data to the compute dtype for each forward, so in training the
matmul saves a compute-dtype copy of every weight for backward. Here a custom autograd function saves the fp8
weight itself and upcasts it again in backward, so weights stay fp8 between a block's forward and its backward.

Apply it after DeepSpeed's ``initialize`` (which casts the whole module to its bf16/fp16 dtype); ZeRO-3, which
partitions frozen weights in that dtype too, is refused (:func:`check_storage_dtype`).
"""

from __future__ import annotations

import fnmatch
import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sat_video.common.errors import ConfigError
from sat_video.model.transformer import MLP, SelfAttention

STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def stored_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears whose weights fp8 storage keeps in fp8, by module name (frozen or not)."""
    owners = {name for name, module in model.named_modules() if isinstance(module, (SelfAttention, MLP))}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[0] in owners}


def check_storage_dtype(model: nn.Module, storage_dtype: str | None, trainable: Sequence[str], zero_stage: int) -> None:
    """Refuse what fp8 storage cannot do in training, before the engine is built: weights it would store that
    ``trainable`` (the globs of ``train.trainable``) trains, and ZeRO-3. ``model`` may live on the meta device. Not a
    config-load check: sampling a fully fine-tuned model with fp8 storage is fine."""
    if storage_dtype is None:
        return
    trained = [f"{name}.weight" for name in stored_linears(model)
               if any(fnmatch.fnmatchcase(f"{name}.weight", pattern) for pattern in trainable)]
    if trained:
        raise _trained_error(storage_dtype, trained, f"train.trainable {list(trainable)}")
    if zero_stage == 3:
        raise ConfigError(
            f"model.dit.storage_dtype={storage_dtype} with deepspeed.zero_stage=3: ZeRO-3 partitions the frozen weights "
            "too and gathers them in the engine's dtype, so they cannot stay fp8 (expected zero_stage 0, 1 or 2); with "
            "LoRA, ZeRO-2 keeps the frozen weights whole on every rank in fp8, or set model.dit.storage_dtype: null to "
            "keep ZeRO-3")


def _trained_error(storage_dtype: str, trained: list[str], what: str) -> ConfigError:
    return ConfigError(
        f"model.dit.storage_dtype={storage_dtype} stores the frozen base weights in fp8 (LoRA only), but {what} trains "
        f"{len(trained)} of them ({', '.join(trained[:3])}{', ...' if len(trained) > 3 else ''}): expected "
        "train.trainable to match none of the attention and MLP weights, e.g. ['mixins.lora.*'] (configs/lora.yaml); "
        "for full fine-tuning (SFT) set model.dit.storage_dtype: null")


class _UpcastLinear(torch.autograd.Function):
    """``F.linear`` of an fp8 weight upcast to ``dtype``, saving the fp8 weight (not the upcast copy) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return F.linear(x, weight.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad.matmul(weight.to(ctx.dtype)) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None


def _upcast_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _UpcastLinear.apply(x, self.weight, self.bias, self.compute_dtype)


def store_frozen_weights(model: nn.Module, storage_dtype: str | None) -> list[str]:
    """Keep the weights of :func:`stored_linears` in ``storage_dtype`` (``None``: nothing changes), each upcast to the
    dtype it had (the compute dtype) for its matmul. Returns the module names stored; a second call stores nothing.

    Raises:
        ConfigError: one of those weights trains, or is a ZeRO-3 partition (see :func:`check_storage_dtype`).
    """
    if storage_dtype is None:
        return []
    stored = STORAGE_DTYPES.values()
    linears = {name: linear for name, linear in stored_linears(model).items() if linear.weight.dtype not in stored}
    trained = [f"{name}.weight" for name, linear in linears.items() if linear.weight.requires_grad]
    if trained:
        raise _trained_error(storage_dtype, trained, "the model (requires_grad)")
    check_storage_dtype(model, storage_dtype, [], zero_stage=3 if any(hasattr(p, "ds_id") for p in model.parameters()) else 0)
    for linear in linears.values():
        linear.compute_dtype = linear.weight.dtype
        linear.weight.data = linear.weight.data.to(STORAGE_DTYPES[storage_dtype])
        linear.forward = types.MethodType(_upcast_forward, linear)
    return list(linears)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are stored."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
