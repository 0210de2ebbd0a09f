"""The per-modality modulation and gated residual: values and hand-written gradients."""

import pytest
import torch
from torch.autograd import gradcheck

from sat_video.model.modulation import gated_residual, modulate, modulate_per_modality
from tests.numerics import assert_close_rel


@pytest.mark.parametrize("text_length", [0, 3, 7])
def test_modulate_per_modality_is_modulate_of_each_part(text_length):
    generator = torch.Generator().manual_seed(text_length)
    x = torch.randn(2, 7, 5, dtype=torch.double, generator=generator, requires_grad=True)
    vectors = [torch.randn(2, 1, 5, dtype=torch.double, generator=generator, requires_grad=True) for _ in range(4)]
    n = text_length
    expected = torch.cat([modulate(x[:, :n], vectors[0], vectors[1]), modulate(x[:, n:], vectors[2], vectors[3])], dim=1)
    assert torch.equal(modulate_per_modality(x, n, tuple(vectors[:2]), tuple(vectors[2:])), expected)
    assert gradcheck(lambda x, *v: modulate_per_modality(x, n, v[:2], v[2:]), (x, *vectors))
    strided = torch.randn(2, 5, 7, dtype=torch.double, generator=generator).transpose(1, 2).requires_grad_()
    assert gradcheck(lambda x, *v: modulate_per_modality(x, n, v[:2], v[2:]), (strided, *vectors))


@pytest.mark.parametrize("text_length", [0, 3, 7])
def test_gated_residual_gates_each_part(text_length):
    generator = torch.Generator().manual_seed(text_length)
    hidden, branch = (torch.randn(2, 7, 5, dtype=torch.double, generator=generator, requires_grad=True) for _ in range(2))
    text_gate, gate = (torch.randn(2, 1, 5, dtype=torch.double, generator=generator, requires_grad=True) for _ in range(2))
    n = text_length
    expected = torch.cat([hidden[:, :n] + text_gate * branch[:, :n], hidden[:, n:] + gate * branch[:, n:]], dim=1)
    assert_close_rel(gated_residual(hidden, branch, n, text_gate, gate), expected)  # an FMA rounds once, not twice
    assert gradcheck(lambda *args: gated_residual(args[0], args[1], n, *args[2:]), (hidden, branch, text_gate, gate))


def test_frozen_vectors_get_no_gradient_and_dtypes_promote():
    x = torch.randn(2, 6, 4, dtype=torch.bfloat16, requires_grad=True)
    shift, scale = torch.randn(2, 1, 4), torch.randn(2, 1, 4)  # frozen modulation (LoRA training), float32
    out = modulate_per_modality(x, 2, (shift, scale), (shift, scale))
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and shift.grad is None
