import math

import pytest
import torch

from sat_video.training.config import OptimizerConfig, ScheduleConfig
from sat_video.training.optim import FiniteAdamW, lr_lambda, parameter_groups, select_trainable


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_schedule_warms_up_then_decays_to_min_never_below(style):
    f = lr_lambda(ScheduleConfig(warmup_iters=10, decay_style=style, min_lr=1e-6), base_lr=1e-4, train_iters=100)
    values = [f(it) for it in range(300)]  # well past the end: SAT's linear decay went negative here
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert min(values) >= 1e-6 / 1e-4 - 1e-12
    if style != "constant":
        assert values[100] == pytest.approx(0.01) and values[299] == pytest.approx(0.01)
        assert all(b <= a + 1e-12 for a, b in zip(values[10:], values[11:]))
    if style == "cosine":
        assert values[55] == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-6)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="decay_style"):
        lr_lambda(ScheduleConfig(decay_style="exp"), 1e-4, 10)
    with pytest.raises(ValueError, match="min_lr"):
        lr_lambda(ScheduleConfig(min_lr=1.0), 1e-4, 10)


def test_trainable_selection_and_decay_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1))
    assert select_trainable(model, ["2.*", "1.weight"]) == ["1.weight", "2.weight", "2.bias"]
    assert not model[0].weight.requires_grad
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([1, 3])] and len(no_decay["params"]) == 2
    with pytest.raises(ValueError, match="'blocks.\\*' matches no parameter"):
        select_trainable(model, ["blocks.*"])


def test_finite_adamw_skips_non_finite_gradients():
    param = torch.nn.Parameter(torch.ones(3))
    opt = FiniteAdamW([param], OptimizerConfig(lr=0.1))
    param.grad = torch.tensor([1.0, math.nan, 1.0])
    opt.step()
    assert opt.last_step_skipped and torch.equal(param.data, torch.ones(3)) and not opt.state[param]
    param.grad = torch.ones(3)
    opt.step()
    assert not opt.last_step_skipped and torch.all(param.data < 1)
