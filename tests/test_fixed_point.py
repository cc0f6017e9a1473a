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
    """Without regularisation (the official SD example's windows, the paper's Table 3 weights):
    estimates 0 and 1 averaged below t = 250, the last iterate (estimate 1's step) above."""
    diffusion, z0 = setup
    _, cond = embeddings(diffusion, ["a cat", "a dog"])
    abar = tiny_pipe.scheduler.alphas_cumprod
    pivot = diffusion.ddim_inversion(z0, cond)
    method = ReNoiseInversion(noise_regularization=False)
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


def official_patch_kl(x0, x1, patch_size=4, num_channels=4):
    """patchify_latents_kl_divergence and latents_kl_divergence of garibida/ReNoise-Inversion@fa83238
    src/renoise_inversion.py (~55-87), transcribed: [1, C, H, W] tensors."""
    patches = [x.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size) for x in (x0, x1)]
    x0, x1 = (p.contiguous().view(-1, num_channels, patch_size * patch_size) for p in patches)
    mu0, mu1, var0, var1 = x0.mean(-1), x1.mean(-1), x0.var(-1), x1.var(-1)
    kl = torch.log((var1 + 1e-6) / (var0 + 1e-6)) + (var0 + (mu0 - mu1) ** 2) / (var1 + 1e-6) - 1
    return kl.abs().sum(-1).sum()


def official_auto_corr_loss(x, rolls):
    """auto_corr_loss (~28-52), transcribed; the rolls come from the project's per-image Random (the
    official code draws them from one torch generator) in the same order."""
    loss = 0.0
    for channel in x[0]:
        noise = channel[None, None]
        while True:
            shift = rolls.randrange(noise.shape[2] // 2)
            loss += (noise * torch.roll(noise, shifts=shift, dims=2)).mean() ** 2
            loss += (noise * torch.roll(noise, shifts=shift, dims=3)).mean() ** 2
            if noise.shape[2] <= 8:
                break
            noise = torch.nn.functional.avg_pool2d(noise, kernel_size=2)
    return loss


def official_noise_regularization(e_t, optimal, rolls, lambda_kl=0.065, lambda_ac=20.0, num_reg_steps=4, num_ac_rolls=5):
    """noise_regularization (~5-25), transcribed, at the official RunConfig's weights (src/config.py)."""
    for _ in range(num_reg_steps):
        var = e_t.detach().clone().requires_grad_()
        official_patch_kl(var, optimal).backward()
        e_t = e_t - lambda_kl * torch.clip(var.grad.detach(), -100, 100)
        for _ in range(num_ac_rolls):
            var = e_t.detach().clone().requires_grad_()
            official_auto_corr_loss(var, rolls).backward()
            e_t = e_t - lambda_ac * var.grad.detach() / num_ac_rolls
        e_t = e_t.detach()
    return e_t


def test_renoise_regularised_step_equals_a_transcription_of_the_official_update(setup, tiny_pipe):
    """One inversion step of inversion_step (renoise_inversion.py@fa83238 ~89-156) with the official
    SD example's settings (examples/inversion_example_sd.py and its RunConfig): one renoising
    iteration, windows [0, 5) below t = 250 and [8, 10) above, regularisation on; per image, as the
    official code runs (batch 1). The reference estimate is eps at z_0 noised to t with the image's
    draw (~105, ~112-133); the RAW estimates are averaged (~141-146); each estimate from index
    avg_range[0] on is regularised before it moves the iterate (~148-151); the average is
    regularised once and its step is the result (~154-156); above t = 250 nothing is regularised."""
    diffusion, z0 = setup
    _, cond = embeddings(diffusion, ["a cat", "a dog"])
    abar = tiny_pipe.scheduler.alphas_cumprod
    pivot = diffusion.ddim_inversion(z0, cond)
    method = ReNoiseInversion()  # the defaults are the official SD example's
    assert (method.num_renoise_steps, method.max_renoise_steps_low, method.average_low, method.average_high) == (1, 5, (0, 5), (8, 10))
    assert (method.noise_regularization, method.lambda_ac, method.lambda_kl, method.num_reg_steps, method.num_ac_rolls) == (True, 20.0, 0.065, 4, 5)
    seeds = [3, 4]
    for k in (0, 3):  # t = 1 (< 250) and t = 601
        t, z_s = diffusion.timesteps[-1 - k], pivot[:, k]
        a_s = abar[t - 1000 // STEPS].item() if k else abar[0].item()
        a_t = abar[t].item()
        state = method.start(diffusion, z0, seeds)
        got = method.solve(diffusion, z_s, t, None, cond, state)

        def inv_step(eps, b):
            return a_t**0.5 * (z_s[b : b + 1] - (1 - a_s) ** 0.5 * eps) / a_s**0.5 + (1 - a_t) ** 0.5 * eps

        avg_range = (0, 5) if t < 250 else (8, 10)
        expected = []
        for b, seed in enumerate(seeds):
            rolls = random.Random(seed)
            with torch.no_grad():
                z_tp1_forward = a_t**0.5 * z0[b : b + 1] + (1 - a_t) ** 0.5 * state["noise"][b : b + 1]
                optimal = tiny_pipe.unet(z_tp1_forward, t, encoder_hidden_states=cond[b : b + 1]).sample
            avg, approximated = None, z_s[b : b + 1]
            for i in range(2):
                with torch.no_grad():
                    noise_pred = tiny_pipe.unet(approximated, t, encoder_hidden_states=cond[b : b + 1]).sample
                if avg_range[0] <= i < avg_range[1]:
                    j = i - avg_range[0]
                    avg = noise_pred.clone() if avg is None else j * avg / (j + 1) + noise_pred / (j + 1)
                if i >= avg_range[0]:
                    noise_pred = official_noise_regularization(noise_pred, optimal, rolls)
                approximated = inv_step(noise_pred, b)
            if avg is not None:
                approximated = inv_step(official_noise_regularization(avg, optimal, rolls), b)
            expected.append(approximated)
        torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-5)
        unregularised = ReNoiseInversion(noise_regularization=False).solve(diffusion, z_s, t, None, cond, {})
        if t < 250:
            assert ((got - unregularised).norm() / got.norm()).item() > 1e-3, "the regularisation acts"
        else:
            assert torch.equal(got, unregularised)


def test_renoise_without_renoising_is_ddim_inversion(setup):
    diffusion, z0 = setup
    method = ReNoiseInversion(num_renoise_steps=0, average_low=[0, 1], average_high=[0, 1], noise_regularization=False)
    inversion = method.invert(diffusion, z0, ["a cat", "a dog"], [0, 1])
    _, cond = embeddings(diffusion, ["a cat", "a dog"])
    torch.testing.assert_close(inversion.pivot, diffusion.ddim_inversion(z0, cond), rtol=1e-6, atol=1e-6)


def test_noise_regularization_lowers_its_losses_and_is_per_image(setup):
    diffusion, z0 = setup
    method = ReNoiseInversion()
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
    [
        ({"num_renoise_steps": -1}, "num_renoise_steps"),
        ({"max_renoise_steps_low": -1}, "max_renoise_steps_low"),
        ({"average_low": [1, 1]}, "average_low"),
        ({"average_high": [-1, 3]}, "average_high"),
        ({"average_high": [2]}, "average_high"),
        ({"noise_regularization": "yes"}, "noise_regularization"),
    ],
)
def test_bad_renoise_settings_are_one_line_errors(settings, message):
    with pytest.raises(SettingError, match=message):
        ReNoiseInversion(**settings)
