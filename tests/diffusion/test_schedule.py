import pytest
import torch
from diffusers import CogVideoXDDIMScheduler

from sat_video.diffusion.schedule import NoiseSchedule, sample_timesteps, scheduler_config, timestep_interval
from tests.numerics import assert_close_rel, assert_identical


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_equals_diffusers(shift):
    ours = NoiseSchedule(shift)
    theirs = CogVideoXDDIMScheduler.from_config(scheduler_config(shift)).alphas_cumprod.double()
    assert_close_rel(ours.alphas_cumprod, theirs)
    assert ours.alphas_cumprod[-1] == 0  # zero terminal SNR
    assert torch.all(ours.alphas_cumprod[1:] < ours.alphas_cumprod[:-1])


def test_shift_lowers_snr():
    assert torch.all(NoiseSchedule(3.0).alphas_cumprod[1:-1] < NoiseSchedule(1.0).alphas_cumprod[1:-1])


def test_noising_and_velocity_are_consistent():
    schedule = NoiseSchedule(3.0)
    x0, eps = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    t = torch.tensor([0, 10, 500, 999])
    xt, v = schedule.add_noise(x0, eps, t), schedule.velocity(x0, eps, t)
    a = schedule.sqrt_alphas_cumprod[t].float().view(-1, 1, 1)
    s = schedule.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1)
    # v-parametrisation: x0 = a x_t - s v and eps = s x_t + a v
    assert_close_rel(a * xt - s * v, x0)
    assert_close_rel(s * xt + a * v, eps)
    assert_identical(xt[-1], eps[-1])  # t = 999 is pure noise: 0 * x0 + 1 * eps
    # plain MSE on v equals SAT's x0 loss weighted by 1 / (1 - abar)
    v_pred = torch.randn_like(v)
    x0_pred = a * xt - s * v_pred
    sat_loss = ((x0_pred - x0) ** 2 / s**2)[:-1]
    torch.testing.assert_close(sat_loss, ((v_pred - v) ** 2)[:-1], atol=1e-3, rtol=1e-4)


def test_two_ranks_draw_from_disjoint_halves():
    assert timestep_interval(0, 2) == (0, 500) and timestep_interval(1, 2) == (500, 1000)
    for rank, (low, high) in ((0, (0, 500)), (1, (500, 1000))):
        drawn = sample_timesteps(20000, timestep_interval(rank, 2), torch.Generator().manual_seed(rank))
        assert drawn.min() >= low and drawn.max() < high
        assert drawn.min() < low + 5 and drawn.max() >= high - 5  # the whole interval is used


def test_intervals_cover_the_range_for_awkward_world_sizes():
    # 1000 % 3 != 0: the largest divisor not above 3 is 2, ranks share intervals
    assert [timestep_interval(r, 3) for r in range(3)] == [(0, 500), (500, 1000), (0, 500)]
    for world in (1, 4, 8, 16, 7):
        covered = sorted({timestep_interval(r, world) for r in range(world)})
        assert covered[0][0] == 0 and covered[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
