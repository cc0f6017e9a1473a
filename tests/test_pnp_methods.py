"""Direct inversion and proximal negative-prompt inversion: corrections of the sampler on the DDIM pivot."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from nulltext.diffusion import Diffusion
from nulltext.editing.edit import edit
from nulltext.methods import DirectInversion, NegativePromptInversion, ProximalNegativePromptInversion
from nulltext.methods.pnp import ProximalHooks
from nulltext.reconstruction import reconstruct, to_uint8
from nulltext.validation import SettingError

STEPS = 5  # timesteps 801, 601, 401, 201, 1
PROMPTS = ["a cat", "a dog"]
REPLACE = {"mode": "replace", "cross_replace": 0.8, "self_replace": 0.4}  # same word count: "a cat" -> "a dog"


@pytest.fixture(scope="module")
def setup(tiny_pipe, sample_images):
    diffusion = Diffusion(tiny_pipe, num_inference_steps=STEPS, guidance_scale=7.5)
    return diffusion, diffusion.encode_images(sample_images[:2])


@pytest.fixture(scope="module")
def direct(setup):
    diffusion, z0 = setup
    return DirectInversion().invert(diffusion, z0, PROMPTS, [0, 1])


@pytest.fixture(scope="module")
def setup64(tiny_pipe, setup):
    """The tiny pipeline in float64: the offsets' correction is exact up to rounding, which the
    random UNet at w = 7.5 amplifies ~10x per step in float32; float64 shows it is rounding."""
    diffusion = Diffusion(copy.deepcopy(tiny_pipe).to(torch.float64), num_inference_steps=STEPS, guidance_scale=7.5)
    z0 = setup[1].double()
    return diffusion, z0, DirectInversion().invert(diffusion, z0, PROMPTS, [0, 1])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_direct_inversion_retraces_the_pivot_at_every_step(setup64):
    diffusion, z0, inversion = setup64
    trajectory = DirectInversion.reconstruct(diffusion, inversion, 7.5)
    pivot = inversion.pivot.flip(1)  # index i: the level after i sampling steps
    for i in range(STEPS + 1):
        assert relative(trajectory[:, i], pivot[:, i]) < 1e-10, f"step {i}"
    # Without the offsets, guided sampling leaves the pivot (the test above can fail).
    plain = diffusion.sample(inversion.z_T, inversion.uncond, inversion.cond)[:, -1]
    assert relative(plain, z0) > 0.05


def test_direct_inversion_reconstruction_is_the_vae_bound(setup, direct):
    diffusion, z0 = setup
    recon = reconstruct(diffusion, direct)
    assert relative(recon.latents, z0) < 1e-2  # float32 rounding, amplified along the steps
    vae = to_uint8(diffusion.decode(z0))
    assert (recon.images.float() - vae.float()).abs().mean().item() < 0.5  # gray levels


def test_direct_inversion_edits_keep_the_source_row_on_the_pivot(setup64, direct, setup):
    diffusion, z0, inversion = setup64
    out = edit(diffusion, inversion.select(1), ["a fox"], REPLACE)
    assert relative(out.latents[0], z0[1].cpu()) < 1e-10
    assert relative(out.latents[1], out.latents[0]) > 1e-3, "the target row is not corrected"
    with pytest.raises(SettingError, match="offsets were computed at w=7.5"):
        edit(setup[0], direct.select(1), ["a fox"], REPLACE, guidance_scale=3.0)


def test_direct_inversion_offset_equals_a_plain_reimplementation(setup, direct, tiny_pipe):
    diffusion = setup[0]
    scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    cond = diffusion.encode_text(PROMPTS)
    null = diffusion.encode_text([""]).expand_as(cond)
    i, t = 1, scheduler.timesteps[1]
    z = direct.pivot[:, STEPS - 1]  # z*_t for t = timesteps[1]
    with torch.no_grad():
        e_u, e_c = (tiny_pipe.unet(z, t, encoder_hidden_states=c).sample for c in (null, cond))
        expected = direct.pivot[:, STEPS - 2] - scheduler.step(e_u + 7.5 * (e_c - e_u), t, z).prev_sample
    # Batched and separate UNet calls round differently; w = 7.5 amplifies it.
    torch.testing.assert_close(direct.extras["source_offsets"][:, i], expected, rtol=1e-3, atol=1e-4)
    assert expected.abs().max() > 1e-3


def test_direct_inversion_refuses_other_guidance_scales(setup, direct):
    with pytest.raises(SettingError, match="w=7.5"):
        reconstruct(setup[0], direct, guidance_scale=1.0)
    with pytest.raises(SettingError, match="extra_guidance_scales"):
        DirectInversion(extra_guidance_scales=[1.0])


def test_negative_prompt_reconstruction_is_ddim_sampling_at_guidance_one(setup):
    diffusion, z0 = setup
    inversion = NegativePromptInversion().invert(diffusion, z0, PROMPTS, [0, 1])
    recon = reconstruct(diffusion, inversion).trajectory
    ddim = diffusion.sample(inversion.z_T, inversion.uncond, inversion.cond, guidance_scale=1.0)
    torch.testing.assert_close(recon, ddim, rtol=1e-5, atol=1e-5)
    assert ((recon[:, -1] - z0).norm() / z0.norm()).item() > 1e-3, "DDIM's error remains"


def test_proximal_guidance_off_equals_negative_prompt_inversion(setup):
    diffusion, z0 = setup
    npi = NegativePromptInversion().invert(diffusion, z0, PROMPTS, [0, 1])
    prox = ProximalNegativePromptInversion(proximal=None, inversion_guidance=False).invert(diffusion, z0, PROMPTS, [0, 1])
    assert torch.equal(reconstruct(diffusion, prox).trajectory, reconstruct(diffusion, npi).trajectory)
    edits = [edit(diffusion, inv.select(0), ["a fox"], REPLACE).latents for inv in (npi, prox)]
    assert torch.equal(*edits)


def test_inversion_guidance_pins_the_source_to_the_pivot_below_recon_t(setup):
    diffusion, z0 = setup
    inversion = ProximalNegativePromptInversion(recon_t=400).invert(diffusion, z0, PROMPTS, [0, 1])
    trajectory = reconstruct(diffusion, inversion).trajectory
    pivot = inversion.pivot.flip(1)
    # Steps at t = 201 and 1 (< 400) end on the pivot; the earlier ones keep DDIM's error.
    torch.testing.assert_close(trajectory[:, -2:], pivot[:, -2:], rtol=1e-6, atol=1e-6)
    assert ((trajectory[:, 3] - pivot[:, 3]).norm() / pivot[:, 3].norm()).item() > 1e-4
    out = edit(diffusion, inversion.select(0), ["a fox"], REPLACE)
    torch.testing.assert_close(out.latents[0], z0[0].cpu(), rtol=1e-6, atol=1e-6)


def test_proximal_step_equals_a_plain_reimplementation(setup):
    diffusion, z0 = setup
    settings = {"proximal": "l0", "quantile": 0.7, "inversion_guidance": True, "recon_lr": 0.5, "recon_t": 400, "dilate_mask": 1}
    pivot = torch.randn(1, STEPS + 1, *z0.shape[1:], generator=torch.Generator().manual_seed(1))
    hooks = ProximalHooks(settings, pivot, diffusion.timesteps, rows=2)
    generator = torch.Generator().manual_seed(0)
    out_u, out_c = torch.randn(2, 2, *z0.shape[1:], generator=generator)
    z = torch.randn(2, *z0.shape[1:], generator=generator)
    i = 3  # t = 201 < recon_t
    got_eps = hooks.guide(i, out_u, out_c, 7.5)
    got_z = hooks.after_step(i, z)
    delta = out_c - out_u
    tau = delta.abs().flatten().quantile(0.7)
    shrunk = torch.sign(delta) * torch.clamp(delta.abs() - tau, min=0)
    torch.testing.assert_close(got_eps, out_u + 7.5 * shrunk)
    mask = F.max_pool2d((shrunk.abs() > tau).float(), 3, stride=1, padding=1)
    target = pivot[:, STEPS - 1 - i]
    torch.testing.assert_close(got_z, z - 0.5 * (z - target) * (1 - mask))
    assert 0 < mask.mean() < 1


@pytest.mark.parametrize(
    "settings, message",
    [({"proximal": "l2"}, "proximal"), ({"quantile": 1.5}, "quantile"), ({"recon_lr": 2.0}, "recon_lr"), ({"proximal": None}, "inversion_guidance")],
)
def test_bad_proximal_settings_are_one_line_errors(settings, message):
    with pytest.raises(SettingError, match=message):
        ProximalNegativePromptInversion(**settings)
