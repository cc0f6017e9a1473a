"""Fixed-point inversion: one iteration is DDIM inversion, more iterations solve the implicit step better."""

import random

import pytest
import torch

from nulltext.diffusion import Diffusion
from nulltext.methods import FixedPointInversion, ReNoiseInversion
from nulltext.methods.fixed_point import autocorrelation_loss, patch_kl
from nulltext.validation import SettingError

STEPS = 5


@pytest.fixture(scope="module")
def setup(tiny_pipe, sample_images):
    diffusion = Diffusion(tiny_pipe, num_inference_steps=STEPS)
    return diffusion, diffusion.encode_images(sample_images[:2])


def embeddings(diffusion, prompts):
    cond = diffusion.encode_text(prompts)
    return diffusion.encode_text([""]).expand_as(cond), cond


def implicit_residual(diffusion, z_t, z_s, t, uncond, cond, w):
    """|| DDIM sampling step of z_t - z_{t-k} || / || z_{t-k} ||: zero for the exact inverse."""
    back = diffusion.schedule.denoise_step(diffusion.guided_output(z_t, t, uncond, cond, w), t, z_t)
    return ((back - z_s).norm() / z_s.norm()).item()


def test_one_iteration_is_ddim_inversion(setup):
    diffusion, z0 = setup
    prompts = ["a cat", "a dog"]
    inversion = FixedPointInversion(num_iterations=1, inversion_guidance_scale=2.0).invert(diffusion, z0, prompts, [0, 1])
    uncond, cond = embeddings(diffusion, prompts)
    expected = diffusion.ddim_inversion(z0, cond, uncond, guidance_scale=2.0)
    assert torch.equal(inversion.pivot, expected)
    assert inversion.iterations == [STEPS, STEPS]


def test_more_iterations_lower_the_implicit_step_residual(setup, tiny_pipe):
    # 20 steps: with larger steps the random UNet is too steep for the iteration to contract.
    # A few steps of the DDIM trajectory of one image, at w = 1 (one UNet call per iteration).
    diffusion, z0 = Diffusion(tiny_pipe, num_inference_steps=20), setup[1][:1]
    uncond, cond = embeddings(diffusion, ["a cat"])
    pivot = diffusion.ddim_inversion(z0, cond)
    residuals = {1: [], 3: [], 10: []}
    for k in (6, 12, 18):  # inversion step k: pivot[k] -> level timesteps[-1 - k]
        t, z_s = diffusion.timesteps[-1 - k], pivot[:, k]
        for iterations, found in residuals.items():
            method = FixedPointInversion(num_iterations=iterations, inversion_guidance_scale=1.0)
            z_t = method.solve(diffusion, z_s, t, uncond, cond, {})
            found.append(implicit_residual(diffusion, z_t, z_s, t, uncond, cond, 1.0))
    assert min(residuals[1]) > 1e-2, "DDIM inversion's own residual is not negligible on the tiny model"
    for few, many in zip(residuals[1], residuals[3]):
        assert many < few / 2, residuals
    for few, many in zip(residuals[3], residuals[10]):
        assert many < few / 10, residuals


def test_one_step_equals_a_plain_implicit_iteration(setup, tiny_pipe):
    diffusion, z0 = setup
    method = FixedPointInversion(num_iterations=4, inversion_guidance_scale=3.0)
    uncond, cond = embeddings(diffusion, ["a cat", "a dog"])
    t = diffusion.timesteps[-1]  # the first inversion step: z_0 (final alpha-bar) -> t = 1 + ...
    a_s, a_t = tiny_pipe.scheduler.alphas_cumprod[0].item(), tiny_pipe.scheduler.alphas_cumprod[t].item()
    with torch.no_grad():
        z = z0
        for _ in range(4):
            e_u, e_c = (tiny_pipe.unet(z, t, encoder_hidden_states=c).sample for c in (uncond, cond))
            eps = e_u + 3.0 * (e_c - e_u)
            z = a_t**0.5 * (z0 - (1 - a_s) ** 0.5 * eps) / a_s**0.5 + (1 - a_t) ** 0.5 * eps
        got = method.solve(diffusion, z0, t, uncond, cond, {})
    torch.testing.assert_close(got, z, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, z0, atol=1e-3)


@pytest.mark.parametrize("settings", [{"num_iterations": 0}, {"guidance_scale": -1.0}, {"inversion_guidance_scale": float("nan")}])
def test_bad_settings_are_one_line_errors(settings):
    with pytest.raises(SettingError, match="is not allowed"):
        FixedPointInversion(**settings)


def test_renoise_step_equals_a_plain_reimplementation(setup, tiny_pipe):
    """Paper Table 3 for SD: estimates 0 and 1 averaged below t = 250, estimate 1 alone above."""
    diffusion, z0 = setup
    _, cond = embeddings(diffusion, ["a cat", "a dog"])
    abar = tiny_pipe.scheduler.alphas_cumprod
    pivot = diffusion.ddim_inversion(z0, cond)
    method = ReNoiseInversion()
    for k in (0, 3):  # t = 1 (< 250, average) and t = 601 (renoised estimate only)
        t, z_s = diffusion.timesteps[-1 - k], pivot[:, k]
        a_s = abar[t - 1000 // STEPS].item() if k else abar[0].item()
        a_t = abar[t].item()

        def step(eps):
            return a_t**0.5 * (z_s - (1 - a_s) ** 0.5 * eps) / a_s**0.5 + (1 - a_t) ** 0.5 * eps

        with torch.no_grad():
            e0 = tiny_pipe.unet(z_s, t, encoder_hidden_states=cond).sample
            e1 = tiny_pipe.unet(step(e0), t, encoder_hidden_states=cond).sample
            expected = step((e0 + e1) / 2 if t < 250 else e1)
            got = method.solve(diffusion, z_s, t, None, cond, method.start(diffusion, z0, [0, 1]))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, step(e0), atol=1e-4), "averaging changes the DDIM step"


def test_renoise_without_renoising_is_ddim_inversion(setup):
    diffusion, z0 = setup
    method = ReNoiseInversion(num_renoise_steps=0, average_low=[0, 1], average_high=[0, 1])
    inversion = method.invert(diffusion, z0, ["a cat", "a dog"], [0, 1])
    _, cond = embeddings(diffusion, ["a cat", "a dog"])
    torch.testing.assert_close(inversion.pivot, diffusion.ddim_inversion(z0, cond), rtol=1e-6, atol=1e-6)


def test_noise_regularization_lowers_its_losses_and_is_per_image(setup):
    diffusion, z0 = setup
    method = ReNoiseInversion(noise_regularization=True)
    state = method.start(diffusion, z0, [0, 1])
    correlated = torch.nn.functional.avg_pool2d(torch.randn(2, 4, 18, 18, generator=torch.Generator().manual_seed(0)), 3, stride=1) * 3
    reference = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    regularized = method.regularize(correlated, reference, state)
    for b in range(2):
        assert patch_kl(regularized[b], reference[b]) < patch_kl(correlated[b], reference[b])
        rolls = lambda: random.Random(0)  # noqa: E731 (the same rolls before and after)
        assert autocorrelation_loss(regularized[b], rolls()) < autocorrelation_loss(correlated[b], rolls())
    # The inversion of an image does not depend on its batch (per-image draws and rolls).
    both = method.invert(diffusion, z0, ["a cat", "a dog"], [5, 6])
    alone = method.invert(diffusion, z0[1:], ["a dog"], [6])
    # Equal up to batched-UNet rounding (other rolls or draws would differ by O(0.1)).
    torch.testing.assert_close(both.z_T[1:], alone.z_T, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize(
    "settings, message",
    [({"num_renoise_steps": -1}, "num_renoise_steps"), ({"average_low": [1, 1]}, "average_low"), ({"average_high": [0, 3]}, "average_high"), ({"noise_regularization": "yes"}, "noise_regularization")],
)
def test_bad_renoise_settings_are_one_line_errors(settings, message):
    with pytest.raises(SettingError, match=message):
        ReNoiseInversion(**settings)
