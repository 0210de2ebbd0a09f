"""AdaLN modulation, shared by the block modulation and the final layer.

CogVideoX modulates and gates the text and the video tokens of one joint sequence with different vectors.
:func:`modulate_per_modality` and :func:`gated_residual` do that in one output buffer each way and compute their
own gradients. Written with slices and ``torch.cat`` instead, every slice's backward would materialise a
zero-filled gradient of the whole sequence and autograd would add them up. Under ``torch.compile`` they take the
plain form: inductor fuses the per-token vectors into one element-wise kernel each way, and dynamo cannot trace
the ``out=`` slices.
"""

import torch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with ``shift`` / ``scale`` of shape ``[B, 1, D]`` broadcast over tokens."""
    return torch.addcmul(shift, x, 1 + scale)


def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _token_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=1, keepdim=True)  # [B, 1, D], the gradient of a vector broadcast over tokens


class _ModulatePerModality(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_condition_tokens, text_shift, text_scale, shift, scale):
        n = num_condition_tokens
        out = torch.empty_like(x, dtype=_result_dtype(x, text_shift, text_scale, shift, scale))
        torch.addcmul(text_shift, x[:, :n], 1 + text_scale, out=out[:, :n])
        torch.addcmul(shift, x[:, n:], 1 + scale, out=out[:, n:])
        ctx.save_for_backward(x, text_scale, scale)
        ctx.num_condition_tokens = n
        return out

    @staticmethod
    def backward(ctx, grad):
        x, text_scale, scale = ctx.saved_tensors
        n, needs = ctx.num_condition_tokens, ctx.needs_input_grad
        text, video = grad[:, :n], grad[:, n:]
        grad_x = None
        if needs[0]:
            grad_x = torch.empty_like(x)
            torch.mul(text, 1 + text_scale, out=grad_x[:, :n])
            torch.mul(video, 1 + scale, out=grad_x[:, n:])
        return (
            grad_x, None,
            _token_sum(text) if needs[2] else None, _token_sum(text * x[:, :n]) if needs[3] else None,
            _token_sum(video) if needs[4] else None, _token_sum(video * x[:, n:]) if needs[5] else None,
        )


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, branch, num_condition_tokens, text_gate, gate):
        n = num_condition_tokens
        out = torch.empty_like(hidden, dtype=_result_dtype(hidden, branch, text_gate, gate))
        torch.addcmul(hidden[:, :n], branch[:, :n], text_gate, out=out[:, :n])
        torch.addcmul(hidden[:, n:], branch[:, n:], gate, out=out[:, n:])
        ctx.save_for_backward(branch, text_gate, gate)
        ctx.num_condition_tokens = n
        return out

    @staticmethod
    def backward(ctx, grad):
        branch, text_gate, gate = ctx.saved_tensors
        n, needs = ctx.num_condition_tokens, ctx.needs_input_grad
        text, video = grad[:, :n], grad[:, n:]
        grad_branch = None
        if needs[1]:
            grad_branch = torch.empty_like(branch)
            torch.mul(text, text_gate, out=grad_branch[:, :n])
            torch.mul(video, gate, out=grad_branch[:, n:])
        return (
            grad if needs[0] else None, grad_branch, None,
            _token_sum(text * branch[:, :n]) if needs[3] else None, _token_sum(video * branch[:, n:]) if needs[4] else None,
        )


def _per_token(text: torch.Tensor, video: torch.Tensor, num_condition_tokens: int, tokens: int) -> torch.Tensor:
    """``[B, 1, D]`` vectors -> ``[B, tokens, D]``: ``text`` on the first ``num_condition_tokens`` tokens, ``video`` after."""
    return torch.cat([text.expand(-1, num_condition_tokens, -1), video.expand(-1, tokens - num_condition_tokens, -1)], dim=1)


def modulate_per_modality(
    x: torch.Tensor, num_condition_tokens: int, text: tuple[torch.Tensor, torch.Tensor], video: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """:func:`modulate` the first ``num_condition_tokens`` tokens of ``x`` ``[B, L + N, D]`` with ``text = (shift, scale)``
    and the rest with ``video = (shift, scale)``, each ``[B, 1, D]``."""
    if torch.compiler.is_compiling():
        shift, scale = (_per_token(t, v, num_condition_tokens, x.shape[1]) for t, v in zip(text, video))
        return modulate(x, shift, scale)
    return _ModulatePerModality.apply(x, num_condition_tokens, *text, *video)


def gated_residual(
    hidden: torch.Tensor, branch: torch.Tensor, num_condition_tokens: int, text_gate: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``hidden + gate * branch`` over ``[B, L + N, D]``, with ``text_gate`` for the first ``num_condition_tokens`` tokens
    and ``gate`` for the rest (both ``[B, 1, D]``)."""
    if torch.compiler.is_compiling():
        return torch.addcmul(hidden, branch, _per_token(text_gate, gate, num_condition_tokens, hidden.shape[1]))
    return _GatedResidual.apply(hidden, branch, num_condition_tokens, text_gate, gate)
