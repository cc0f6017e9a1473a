"""EDICT and BDIA: exact in float64, one step against a plain re-implementation, guidance enforced, no P2P."""

import pytest
import torch

from nulltext.diffusion import Diffusion
from nulltext.editing.edit import edit
from nulltext.editing.errors import EditError
from nulltext.methods import BDIAInversion, EDICTInversion
from nulltext.validation import SettingError

STEPS = 5  # odd: EDICT's alternating order must be exact for any number of steps


@pytest.fixture(scope="module")
def setup(tiny_pipe, sample_images):
    diffusion = Diffusion(tiny_pipe, num_inference_steps=STEPS)
    z0 = diffusion.encode_images(sample_images[:2])
    cond = diffusion.encode_text(["a cat", "a dog"])
    return diffusion, z0, diffusion.encode_text([""]).expand_as(cond), cond


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", [EDICTInversion(), BDIAInversion(gamma=0.9)], ids=["edict", "bdia"])
def test_float64_inversion_then_reconstruction_returns_the_latents(setup, method):
    diffusion, z0 = setup[:2]
    inversion = method.invert(diffusion, z0, ["a cat", "a dog"], [0, 1])
    assert inversion.z_T.dtype == torch.float64
    assert relative(inversion.z_T, z0.double()) > 0.1, "z_T is noise, not the input"
    trajectory = type(method).reconstruct(diffusion, inversion, inversion.guidance_scale)
    assert trajectory.shape[1] == STEPS + 1
    assert relative(trajectory[:, -1], z0.double()) < 1e-10
    assert diffusion.unet.dtype == torch.float32, "the UNet is back in float32"


def test_edict_one_step_inverted_then_stepped_returns_its_input(setup):
    diffusion, _, uncond, cond = (x.double() if isinstance(x, torch.Tensor) else x for x in setup)
    x, y = torch.randn(2, 2, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with diffusion.unet_dtype(torch.float64), torch.no_grad():
        for i in (1, 2):  # both orders of the leapfrog
            back = EDICTInversion.invert_step(diffusion, i, x, y, uncond, cond, 7.0, 0.93, True)
            again = EDICTInversion.denoise_step(diffusion, i, *back, uncond, cond, 7.0, 0.93, True)
            assert relative(back[0], x) > 1e-2
            assert relative(again[0], x) < 1e-12 and relative(again[1], y) < 1e-12


def test_bdia_one_step_inverted_then_stepped_returns_its_input(setup):
    diffusion, _, uncond, cond = (x.double() if isinstance(x, torch.Tensor) else x for x in setup)
    z, z_next = torch.randn(2, 2, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with diffusion.unet_dtype(torch.float64), torch.no_grad():
        for k in (1, STEPS - 1):
            z_prev = BDIAInversion.invert_step(diffusion, k, z, z_next, uncond, cond, 3.0, 0.5)
            assert relative(BDIAInversion.denoise_step(diffusion, k, z_prev, z, uncond, cond, 3.0, 0.5), z_next) < 1e-12


def plain_guided_eps(pipe, z, t, uncond, cond, w):
    e_u, e_c = (pipe.unet(z, t, encoder_hidden_states=c).sample for c in (uncond, cond))
    return e_u + w * (e_c - e_u)


def test_edict_step_equals_a_plain_reimplementation(setup, tiny_pipe):
    diffusion, z0, uncond, cond = setup
    abar = tiny_pipe.scheduler.alphas_cumprod
    x, y = z0, z0.flip(0)
    for i in (0, 1):  # x first, then y first
        t = diffusion.timesteps[i]
        a_t, a_prev = abar[t].item(), abar[t - 1000 // STEPS].item()
        a = (a_prev / a_t) ** 0.5
        b = (1 - a_prev) ** 0.5 - a * (1 - a_t) ** 0.5
        with torch.no_grad():
            first, second = (x, y) if i == 0 else (y, x)
            first = a * first + b * plain_guided_eps(tiny_pipe, second, t, uncond, cond, 7.0)
            second = a * second + b * plain_guided_eps(tiny_pipe, first, t, uncond, cond, 7.0)
            ex, ey = (first, second) if i == 0 else (second, first)
            ex = 0.93 * ex + 0.07 * ey
            ey = 0.93 * ey + 0.07 * ex
            got = EDICTInversion.denoise_step(diffusion, i, x, y, uncond, cond, 7.0, 0.93, True)
        torch.testing.assert_close(got[0], ex, rtol=1e-3, atol=1e-4)  # batched vs separate calls, times w
        torch.testing.assert_close(got[1], ey, rtol=1e-3, atol=1e-4)  # batched vs separate calls, times w


def test_bdia_step_equals_a_plain_reimplementation(setup, tiny_pipe):
    diffusion, z0, uncond, cond = setup
    abar = tiny_pipe.scheduler.alphas_cumprod
    z_prev, z, k = z0.flip(0), z0, 2
    t_prev, t, t_next = (diffusion.timesteps[j] for j in (k - 1, k, k + 1))

    def ddim(z, eps, a_from, a_to):  # x0 from (z, eps) at one level, re-noised to another
        return a_to**0.5 * (z - (1 - a_from) ** 0.5 * eps) / a_from**0.5 + (1 - a_to) ** 0.5 * eps

    with torch.no_grad():
        eps = plain_guided_eps(tiny_pipe, z, t, uncond, cond, 3.0)
        here = abar[t].item()
        expected = 0.8 * z_prev - 0.8 * ddim(z, eps, here, abar[t_prev].item()) + ddim(z, eps, here, abar[t_next].item())
        got = BDIAInversion.denoise_step(diffusion, k, z_prev, z, uncond, cond, 3.0, 0.8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [EDICTInversion, BDIAInversion])
def test_guidance_must_be_the_same_both_ways_and_p2p_is_refused(setup, cls):
    diffusion, z0 = setup[:2]
    with pytest.raises(SettingError, match="extra_guidance_scales"):
        cls(extra_guidance_scales=[1.0])
    inversion = cls(dtype="float32").invert(diffusion, z0[:1], ["a cat"], [0])
    with pytest.raises(SettingError, match=f"{cls.name} is exact only at the guidance it inverted with"):
        cls.reconstruct(diffusion, inversion, inversion.guidance_scale + 1)
    with pytest.raises(EditError, match=f"{cls.name} inversions cannot be edited here.*direct_inversion"):
        edit(diffusion, inversion, ["a dog"], {"mode": "replace"})


@pytest.mark.parametrize("settings", [{"dtype": "float16"}, {"guidance_scale": -2.0}])
def test_bad_settings_are_one_line_errors(settings):
    for cls in (EDICTInversion, BDIAInversion):
        with pytest.raises(SettingError, match="is not allowed"):
            cls(**settings)
    with pytest.raises(SettingError, match="mixing"):
        EDICTInversion(mixing=0.0)
    with pytest.raises(SettingError, match="gamma"):
        BDIAInversion(gamma=1.5)
