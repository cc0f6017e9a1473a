"""The DDIM step in both directions against diffusers' own schedulers (independent implementations)."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from nulltext.ddim import DDIMSchedule
from nulltext.models import SD_SCHEDULER_CONFIG


@pytest.fixture(params=["epsilon", "v_prediction"])
def config(request):
    return {**SD_SCHEDULER_CONFIG, "prediction_type": request.param}


def test_timesteps_and_final_alpha_are_the_official_ones():
    schedule = DDIMSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG, 50)
    assert schedule.timesteps == tuple(range(981, 0, -20))
    assert schedule.step_ratio == 20
    # set_alpha_to_one=False: the value past the last step is alpha_bar[0] = 1 - 0.00085.
    assert schedule.alpha(-19) == pytest.approx(0.99915, abs=1e-7)


def test_denoise_step_matches_diffusers_ddim_step(config):
    schedule = DDIMSchedule.from_scheduler_config(config, 50)
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    for t in schedule.timesteps:
        z, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = reference.step(out, t, z, eta=0.0).prev_sample
        torch.testing.assert_close(schedule.denoise_step(out, t, z), expected, atol=1e-6, rtol=0)


def test_invert_step_matches_diffusers_inverse_scheduler(config):
    schedule = DDIMSchedule.from_scheduler_config(config, 50)
    # from_config would silently drop the pipeline's steps_offset=1: pass it explicitly.
    reference = DDIMInverseScheduler.from_config(config, steps_offset=1)
    reference.set_timesteps(50)
    assert tuple(int(t) for t in reference.timesteps) == tuple(reversed(schedule.timesteps))
    g = torch.Generator().manual_seed(1)
    for t in reference.timesteps:
        z, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = reference.step(out, t, z).prev_sample
        torch.testing.assert_close(schedule.invert_step(out, int(t), z), expected, atol=1e-6, rtol=0)


def test_inversion_then_denoising_with_the_same_noise_is_exact():
    """With a fixed epsilon, a step up then down returns the start (eta = 0 is deterministic)."""
    schedule = DDIMSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG, 50)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eps = torch.randn_like(z)
    up = schedule.invert_step(eps, 501, z)
    assert not torch.allclose(up, z)
    torch.testing.assert_close(schedule.denoise_step(eps, 501, up), z, atol=1e-5, rtol=0)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="sample"):
        DDIMSchedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "prediction_type": "sample"}, 50)
