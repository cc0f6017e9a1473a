"""Direct inversion and proximal negative-prompt inversion: corrections of the sampler on the DDIM pivot."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from hydra.utils import instantiate

from helpers import composed
from nulltext.diffusion import Diffusion
from nulltext.editing.edit import edit
from nulltext.methods import DirectInversion, NegativePromptInversion, ProximalNegativePromptInversion
from nulltext.methods.pnp import ProximalHooks
from nulltext.models import pipeline_resolution
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
    # float32: the closed-loop offsets are replayed exactly (open-loop ones ended 1e-2 off here).
    pivot = direct.pivot.flip(1)
    for i in range(STEPS + 1):
        assert relative(recon.trajectory[:, i], pivot[:, i]) < 1e-6, f"step {i}"
    vae = to_uint8(diffusion.decode(z0))
    assert (recon.images.float() - vae.float()).abs().mean().item() < 0.5  # gray levels


@pytest.mark.parametrize("data", ["samples", "scenes"])
def test_direct_inversion_retraces_the_pivot_in_float32_on_the_shipped_model(data, tmp_path):
    """Every image of experiment=compare_methods (the photos, `motorcycle` among them, and the
    held-out scenes) on the shipped model at its sampler (50 steps, w = 7.5), float32, in one batch
    per data set. Offsets taken at the pivot (open loop) ended 1.6e-1 off it on `motorcycle`."""
    overrides = ["experiment=compare_methods", "model=pocket", f"data={data}", "inversion=direct_inversion"]
    with composed("config", overrides, tmp_path) as cfg:
        torch.set_num_threads(1)
        pipe = instantiate(cfg.model)
        diffusion = instantiate(cfg.diffusion, pipe=pipe)
        assert (diffusion.schedule.num_steps, diffusion.guidance_scale) == (50, 7.5)
        dataset = instantiate(cfg.data, resolution=pipeline_resolution(pipe)).dataset
        method = instantiate(cfg.inversion)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == {"samples": 9, "scenes": 16}[data]
    z0 = diffusion.encode_images(torch.stack([item["image"] for item in items]))
    inversion = method.invert(diffusion, z0, [item["caption"] for item in items], list(range(len(items))))
    trajectory = reconstruct(diffusion, inversion).trajectory
    pivot = inversion.pivot.flip(1)
    error = (trajectory - pivot).flatten(2).norm(dim=2) / pivot.flatten(2).norm(dim=2)  # [image, step]
    worst = {item["id"]: e for item, e in zip(items, error.max(dim=1).values.tolist())}
    assert max(worst.values()) < 1e-7, worst


def test_direct_inversion_edits_keep_the_source_row_on_the_pivot(setup64, direct, setup):
    diffusion, z0, inversion = setup64
    out = edit(diffusion, inversion.select(1), ["a fox"], REPLACE)
    assert relative(out.latents[0], z0[1].cpu()) < 1e-10
    assert relative(out.latents[1], out.latents[0]) > 1e-3, "the target row is not corrected"
    with pytest.raises(SettingError, match="offsets were computed at w=7.5"):
        edit(setup[0], direct.select(1), ["a fox"], REPLACE, guidance_scale=3.0)


def test_direct_inversion_offsets_equal_a_transcription_of_the_official_loop(setup, direct, tiny_pipe):
    """cure-lab/PnPInversion@07f97f4 models/p2p/inversion.py, DirectInversion.offset_calculate
    (the closed loop around line 389): one UNet call on [z; z] with [null; C], guidance, the DDIM step, offset = pivot - step,
    and the next z is the step PLUS the offset (closed loop), here with diffusers' DDIMScheduler."""
    diffusion = setup[0]
    scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    cond = diffusion.encode_text(PROMPTS)
    null = diffusion.encode_text([""]).expand_as(cond)
    latent_cur, expected = direct.pivot[:, -1], []
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            e_u, e_c = tiny_pipe.unet(torch.cat([latent_cur] * 2), t, encoder_hidden_states=torch.cat([null, cond])).sample.chunk(2)
            latents_prev_rec = scheduler.step(e_u + 7.5 * (e_c - e_u), t, latent_cur).prev_sample
            loss = direct.pivot[:, STEPS - 1 - i] - latents_prev_rec
            expected.append(loss)
            latent_cur = latents_prev_rec + loss
    # The two DDIM formulas round differently and one guided step of the random UNet amplifies
    # that (~10x); the closed loop keeps it from adding up over the steps.
    torch.testing.assert_close(direct.extras["source_offsets"], torch.stack(expected, dim=1), rtol=1e-3, atol=1e-4)
    assert expected[1].abs().max() > 1e-3


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


def test_inversion_guidance_pins_the_edits_source_row_to_the_pivot_below_recon_t(setup):
    diffusion, z0 = setup
    inversion = ProximalNegativePromptInversion(recon_t=400).invert(diffusion, z0, PROMPTS, [0, 1])
    out = edit(diffusion, inversion.select(0), ["a fox"], REPLACE)
    torch.testing.assert_close(out.latents[0], z0[0].cpu(), rtol=1e-6, atol=1e-6)
    without = ProximalNegativePromptInversion(inversion_guidance=False).invert(diffusion, z0, PROMPTS, [0, 1])
    assert relative(edit(diffusion, without.select(0), ["a fox"], REPLACE).latents[0], z0[0].cpu()) > 1e-4


def test_proximal_reconstruction_is_negative_prompt_sampling_and_stable(setup, tiny_pipe):
    """As the official code (phymhan/prompt-to-prompt@9955a1f negative_prompt_inversion.py ~602-603,
    inference_stage=False), no thresholding and no inversion guidance when reconstructing. A
    threshold over one row is a quantile of |eps(z, C) - eps(z, C)|, rounding noise: exactly 0 on
    this CPU (the old reconstruction was then pinned to the pivot at every step below recon_t),
    ~4e-15 where the two halves of the batch round differently (float64 elsewhere), where the edit
    mask, and with it the reconstruction, jumped with the last bits of z_0. Stability is checked in
    float64, where float32's own rounding in the random UNet does not cover it."""
    diffusion, z0 = setup
    method = ProximalNegativePromptInversion(recon_t=1000, dilate_mask=0)  # inversion guidance at every step
    npi = reconstruct(diffusion, NegativePromptInversion().invert(diffusion, z0, PROMPTS, [0, 1])).trajectory
    prox = reconstruct(diffusion, method.invert(diffusion, z0, PROMPTS, [0, 1])).trajectory
    assert torch.equal(prox, npi)
    diffusion64 = Diffusion(copy.deepcopy(tiny_pipe).to(torch.float64), num_inference_steps=STEPS, guidance_scale=7.5)
    z0 = z0.double()
    a, b = (method.reconstruct(diffusion64, method.invert(diffusion64, z, PROMPTS, [0, 1]), 7.5)[:, -1] for z in (z0, z0 + 1e-6))
    shift = relative(z0 + 1e-6, z0)  # 2e-5 (the tiny model's latents are small); the reconstruction moves 1e-4
    assert relative(b, a) < 20 * shift, (relative(b, a), shift)


def test_proximal_l1_is_the_official_asymmetric_thresholding():
    """tau = 1 (quantile -1), w = 1, eps(z, u) = 0: the guided output is Delta'. Soft thresholding
    gives 2, 0.5, 0, 0, 0, -0.5, -2; then the official two wheres (ptp_utils.py ~123-124): 2 -> 1,
    0.5 -> -0.5 -> 0.5 (unchanged), -0.5 -> 0.5, -2 -> -1. A symmetric tau sign() would give -0.5."""
    settings = {"proximal": "l1", "quantile": -1.0, "inversion_guidance": False, "recon_lr": 1.0, "recon_t": 400, "dilate_mask": 1}
    hooks = ProximalHooks(settings, None, (1,), rows=1)
    delta = torch.tensor([3.0, 1.5, 0.5, 0.0, -0.5, -1.5, -3.0]).view(1, 1, 1, 7)
    got = hooks.guide(0, torch.zeros_like(delta), delta, 1.0)
    assert got.flatten().tolist() == [1.0, 0.5, 0.0, 0.0, 0.0, 0.5, -1.0]


def test_proximal_step_equals_a_plain_reimplementation(setup):
    """The l0 branch of diffusion_step (phymhan/prompt-to-prompt@9955a1f ptp_utils.py, ~97-155):
    threshold = quantile of |Delta| over the whole batch, soft thresholding, mask |Delta'| > tau
    dilated, then inversion guidance z - lr (z - x*_{t-k}) (1 - mask) after the step."""
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
