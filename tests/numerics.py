"""How tests compare numbers (the rule: docs/testing.md, "Comparing numbers").

Identity claims (the same computation, a round trip, a copy) compare with ``torch.equal``. Everything else (another
kernel, batch size, thread count or CPU, so float sums in another order) compares with :func:`assert_close_rel`.
"""

from __future__ import annotations

import torch

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
"""Relative error allowed where sums may run in another order: about 100 units in the last place of float32
(eps 1.2e-7, so sums of thousands of terms in any order), and the same margin for the other dtypes."""
FLOAT32_RTOL = RTOL[torch.float32]
"""For numbers a float32 computation reported (losses in metrics.jsonl): ``pytest.approx(..., rel=FLOAT32_RTOL)``."""


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None, what: str = "") -> None:
    """``|actual - expected| <= rtol * (|expected| + max|expected|)`` elementwise.

    The second term is the absolute floor: an element near zero (a sum that cancels) carries the rounding error of
    its terms, which are of the tensor's scale, not of its own size. ``rtol`` defaults to :data:`RTOL` of
    ``expected``'s dtype; pass a larger one for deep chains (many layers, many sampling steps) and say why.
    """
    rtol = RTOL[expected.dtype] if rtol is None else rtol
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale,
                               msg=(lambda m: f"{what}: {m}") if what else None)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-identical values (same shape and dtype), with the largest difference in the message when not."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}")
    if not torch.equal(actual, expected):
        difference = (actual.double() - expected.double()).abs()
        raise AssertionError(f"{what}: not identical, {int((difference > 0).sum())} of {difference.numel()} elements "
                             f"differ, by up to {difference.max().item():.3g}")
