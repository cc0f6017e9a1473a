"""Uni-Inv and FlowEdit on the tiny SD3 and FLUX models: each against a re-implementation of its official
order of operations, through the command line, and the answers known in advance."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from helpers import assert_reconstruct_reproduces, composed
from nulltext.api import load_pipeline
from nulltext.cli import run_inversion
from nulltext.cost import UNetCounter
from nulltext.diffusion import Diffusion
from nulltext.editing.cli import check_edit, run_edit
from nulltext.editing.errors import EditError
from nulltext.editing.flowedit import flowedit
from nulltext.methods import FlowInversion, UniInversion
from nulltext.validation import SettingError

STEPS = 4
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
FAMILIES = ["tiny_sd3", "tiny_flux"]


@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def photo(sample_images):
    return sample_images[:1]


def reference_scheduler(pipe, steps: int) -> FlowMatchEulerDiscreteScheduler:
    """The stock scheduler set up as StableDiffusion3Pipeline / FluxPipeline set it up (64 px: 8x8 FLUX tokens)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if isinstance(pipe, FluxPipeline):
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(64, 256, 4096, 0.5, 1.15))
    else:
        scheduler.set_timesteps(steps)
    return scheduler


# -- Uni-Inv --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_initial", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_uniinv_follows_the_official_scheduler_step_by_step(pipes, photo, name, zero_initial):
    """DSL-Lab/UniEdit-Flow@e3633bc UniEdit-Flow_diffusers/schedulers/UniInvEulerScheduler.py, re-implemented
    here: set_timesteps (lines 66-85: the sampler's sigmas flipped, 0 first; zero_initial drops it) and the
    state machine of step (lines 124-163), the model called at every inverse timestep on the latent the
    previous call returned, at w = 1 as demo_inv_rec.py inverts."""
    diffusion = Diffusion(pipes[name], STEPS, 1.0)
    z0 = diffusion.encode_images(photo)
    cond = diffusion.encode_text([SOURCE])
    with UNetCounter(diffusion.unet) as calls:
        inversion = UniInversion(zero_initial=zero_initial).invert(diffusion, z0, [SOURCE], [0])
    assert calls.rows == STEPS + (0 if zero_initial else 1)

    reference = reference_scheduler(pipes[name], STEPS)
    sigmas = reference.sigmas.flip(0)  # [0, sigma_{S-1}, ..., sigma_0]
    timesteps = torch.cat([reference.timesteps, torch.zeros(1)]).flip(0)
    stored = None
    if zero_initial:
        sigmas, timesteps, stored = sigmas[1:], timesteps[1:], "placeholder"
    latent, corrected = z0, []
    for k, t in enumerate(timesteps):
        with torch.no_grad():
            velocity = diffusion.model_output(latent, t.item(), cond, 1.0)
        if stored is None:  # the first call (lines 126-138)
            stored = latent
            latent = latent + velocity * (sigmas[k + 1] - sigmas[k])
            continue
        sigma, sigma_next = (sigmas[k - 1], sigmas[k]) if not isinstance(stored, str) else (0, sigmas[k])
        if isinstance(stored, str):  # zero_initial (lines 143-146)
            stored = latent
        stored = stored + (sigma_next - sigma) * velocity  # the corrected latent (line 153)
        corrected.append(stored)
        latent = stored + (sigmas[k + 1] - sigma_next) * velocity if k + 1 < len(sigmas) else stored  # the next prediction
    expected = torch.stack(corrected, dim=1)
    assert expected.shape[1] == STEPS
    torch.testing.assert_close(inversion.pivot[:, 1:], expected, atol=0, rtol=0)
    assert torch.equal(inversion.z_T, expected[:, -1]) and (inversion.z_T - z0).abs().mean() > 0.1


@pytest.mark.parametrize("name", FAMILIES)
def test_uniinv_steps_come_closer_to_inverting_the_sampler_than_reverse_euler(pipes, photo, name):
    """Uni-Inv's corrected step approximates the implicit one, z_k = z_{k-1} + dsigma v(z_k, t_k), whose exact
    solution the Euler sampler undoes: one sampling step from each z_k returns nearer z_{k-1} than from
    plain reverse Euler's z_k (the velocity there read on z_{k-1}), at every step."""
    diffusion = Diffusion(pipes[name], STEPS, 1.0, "source")
    z0 = diffusion.encode_images(photo)
    cond = diffusion.encode_text([SOURCE])
    residuals = {}
    for method in (UniInversion(), FlowInversion()):
        pivot = method.invert(diffusion, z0, [SOURCE], [0]).pivot
        found = []
        for k, t in enumerate(reversed(diffusion.timesteps), start=1):
            with torch.no_grad():
                back = diffusion.schedule.denoise_step(diffusion.model_output(pivot[:, k], t, cond, 1.0), t, pivot[:, k])
            found.append(((back - pivot[:, k - 1]).norm() / pivot[:, k - 1].norm()).item())
        residuals[method.name] = found
    assert max(residuals["flow_inversion"]) > 1e-2, residuals
    for uni, plain in zip(residuals["uniinv"], residuals["flow_inversion"]):
        assert uni < 0.7 * plain, residuals  # 0.6 at most on these models (tiny_flux's first step), 0.3 on tiny_sd3


@pytest.mark.parametrize("model", FAMILIES)
def test_uniinv_through_the_cli_writes_complete_metrics_and_a_reusable_artifact(model, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"model={model}", "inversion=uniinv", "diffusion.num_inference_steps=4", "data.limit=1", "logger=csv"]
    with composed("config", overrides, run_dir) as cfg:
        metrics = run_inversion(cfg)
    assert (metrics["method"], metrics["model"], metrics["num_images"], metrics["num_failed"]) == ("uniinv", model, 1, 0)
    for key in ("psnr_mean", "lpips_mean", "ssim_mean", "vae_psnr_mean", "seconds_mean", "peak_memory_mib_mean"):
        assert np.isfinite(metrics[key]), key
    image = metrics["images"][0]
    # S + 1 velocities to invert; the w = 1 reconstruction one row per step on both families.
    assert (image["inversion_unet_evaluations"], image["reconstruction_unet_evaluations"]) == (5, 4)
    assert len(image["latent_error"]["mse"]) == 5 and image["latent_error"]["mse"][0] == 0.0
    assert_reconstruct_reproduces(run_dir, image["id"], tmp_path / "rec")


# -- FlowEdit -------------------------------------------------------------------------------------------


def official_flowedit(pipe, x_src, steps, n_max, src_w, tar_w, seed):
    """fallenshock/FlowEdit FlowEdit_utils.py (lines of the copy in netita/FlowEdit@02116f6), n_avg 1, n_min 0:
    FlowEditSD3 lines 171-205 (one transformer call on [zt_src, zt_src, zt_tar, zt_tar] with [negative "",
    source, negative "", target], calc_v_sd3 54-80; t_i = t / 1000) and FlowEditFLUX lines 322-372 (packed
    latents, two calls with the guidance inputs, calc_v_flux 84-107; t_i = the scheduler's sigmas). The
    noise: the draws nulltext makes (one generator per target), packed for FLUX."""
    scheduler = reference_scheduler(pipe, steps)
    timesteps = scheduler.timesteps
    generator = torch.Generator().manual_seed(seed)
    b, c, h, w = x_src.shape
    flux = isinstance(pipe, FluxPipeline)
    if flux:
        pack = lambda z: FluxPipeline._pack_latents(z, b, c, h, w)  # noqa: E731
        length = pipe.tokenizer_2.model_max_length
        (src, src_pooled, text_ids), (tar, tar_pooled, _) = (pipe.encode_prompt(p, None, max_sequence_length=length) for p in (SOURCE, TARGET))
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_src.device, x_src.dtype)
        guidance = {"src": torch.tensor([src_w]), "tar": torch.tensor([tar_w])}

        def velocity(z, t, embeds, pooled, which):
            return pipe.transformer(
                hidden_states=z, timestep=t.expand(1) / 1000, guidance=guidance[which], encoder_hidden_states=embeds,
                txt_ids=text_ids, img_ids=image_ids, pooled_projections=pooled, return_dict=False,
            )[0]
    else:
        pack = lambda z: z  # noqa: E731
        length = pipe.tokenizer_3.model_max_length
        encoded = [pipe.encode_prompt(p, None, None, negative_prompt="", do_classifier_free_guidance=True, max_sequence_length=length) for p in (SOURCE, TARGET)]
        embeds = torch.cat([encoded[0][1], encoded[0][0], encoded[1][1], encoded[1][0]])
        pooled = torch.cat([encoded[0][3], encoded[0][2], encoded[1][3], encoded[1][2]])
    x = pack(x_src)
    zt_edit = x.clone()
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            if steps - i > n_max:
                continue
            noise = pack(torch.randn(x_src.shape, generator=generator))
            if flux:
                t_i, t_im1 = scheduler.sigmas[i], scheduler.sigmas[i + 1]
            else:
                t_i = t / 1000
                t_im1 = timesteps[i + 1] / 1000 if i + 1 < len(timesteps) else torch.zeros_like(t_i)
            zt_src = (1 - t_i) * x + t_i * noise
            zt_tar = zt_edit + zt_src - x
            if flux:
                v_src = velocity(zt_src, t, src, src_pooled, "src")
                v_tar = velocity(zt_tar, t, tar, tar_pooled, "tar")
            else:
                out = pipe.transformer(
                    hidden_states=torch.cat([zt_src, zt_src, zt_tar, zt_tar]), timestep=t.expand(4),
                    encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False,
                )[0]
                src_u, src_c, tar_u, tar_c = out.chunk(4)
                v_src, v_tar = src_u + src_w * (src_c - src_u), tar_u + tar_w * (tar_c - tar_u)
            v_delta_avg = torch.zeros_like(x) + (1 / 1) * (v_tar - v_src)
            zt_edit = zt_edit + (t_im1 - t_i) * v_delta_avg
    side = w * pipe.vae_scale_factor
    return FluxPipeline._unpack_latents(zt_edit, side, side, pipe.vae_scale_factor) if flux else zt_edit


@pytest.mark.parametrize("name, src_w, tar_w", [("tiny_sd3", 3.5, 13.5), ("tiny_flux", 1.5, 5.5)])
def test_flowedit_steps_follow_the_official_code(pipes, photo, name, src_w, tar_w):
    """Two steps (n_max = 2 of 4: the official skip rule, both step sizes) at the published guidance scales."""
    diffusion = Diffusion(pipes[name], STEPS)
    x_src = diffusion.encode_images(photo)
    with UNetCounter(diffusion.unet) as calls:
        out = flowedit(diffusion, x_src, SOURCE, [TARGET], n_max=2, seed=3)
    assert out.settings["src_guidance_scale"] == src_w and out.settings["tar_guidance_scale"] == tar_w  # the published values
    assert calls.rows == 2 * (4 if name == "tiny_sd3" else 2) == out.settings["denoiser_evaluations"]
    expected = official_flowedit(pipes[name], x_src, STEPS, 2, src_w, tar_w, seed=3)
    assert torch.equal(out.latents[:1], x_src)
    assert (out.latents[1:] - x_src).abs().mean() > 1e-3, "the edit moved"
    torch.testing.assert_close(out.latents[1:], expected)


@pytest.mark.parametrize("name", FAMILIES)
def test_flowedit_to_the_source_prompt_at_the_source_scale_returns_the_source_exactly(pipes, photo, name):
    """Target == source with one guidance scale: both velocities are the same call on the same latent, their
    difference is zero at every step, and the ODE never leaves x_src. Either change moves the result."""
    diffusion = Diffusion(pipes[name], STEPS)
    x_src = diffusion.encode_images(photo)
    same = flowedit(diffusion, x_src, SOURCE, [SOURCE], n_max=STEPS, src_guidance_scale=4.0, tar_guidance_scale=4.0, n_avg=2)
    assert torch.equal(same.latents[1:], x_src) and torch.equal(same.images[1], same.images[0])
    other_scale = flowedit(diffusion, x_src, SOURCE, [SOURCE], n_max=STEPS, src_guidance_scale=4.0, tar_guidance_scale=6.0)
    other_prompt = flowedit(diffusion, x_src, SOURCE, [TARGET], n_max=STEPS, src_guidance_scale=4.0, tar_guidance_scale=4.0)
    for moved in (other_scale, other_prompt):
        assert (moved.latents[1:] - x_src).abs().mean() > 1e-3
    # n_max = 0 runs no step: nothing to edit.
    assert torch.equal(flowedit(diffusion, x_src, SOURCE, [TARGET], n_max=0).latents[1:], x_src)


@pytest.fixture
def photo_file(photo, tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(photo[0].permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.mark.parametrize(
    "model, steps, first_step, per_step",
    [
        ("tiny_sd3", ["diffusion.num_inference_steps=4"], 0, 4),  # n_max 33 > 4: every step, CFG on both rows
        ("tiny_flux", [], 28 - 24, 2),  # FLUX's published 28 steps, the last 24 run, one call per prompt
    ],
)
def test_flowedit_through_the_cli_writes_the_edit_and_its_records(model, steps, first_step, per_step, photo_file, tmp_path):
    out_dir = tmp_path / "edit"
    overrides = [f"model={model}", f"image={photo_file}", f"caption={SOURCE}", f"prompts=[{TARGET}]", "mode=flowedit", *steps]
    with composed("edit", overrides, out_dir) as cfg:
        metrics = run_edit(cfg)
    assert (metrics["method"], metrics["mode"], metrics["source_prompt"]) == ("flowedit", "flowedit", SOURCE)
    edit = json.loads((out_dir / "settings.json").read_text())["edit"]
    published = {"tiny_sd3": (33, 3.5, 13.5), "tiny_flux": (24, 1.5, 5.5)}[model]
    assert (edit["n_max"], edit["src_guidance_scale"], edit["tar_guidance_scale"], edit["first_step"]) == (*published, first_step)
    assert edit["denoiser_evaluations_per_step"] == per_step
    assert json.loads((out_dir / "metrics.json").read_text())["edits"][0]["file"] == "edits/01_a_photo_of_a_dog.png"
    edited = np.asarray(Image.open(out_dir / "edits" / "01_a_photo_of_a_dog.png")).astype(int)
    source = np.asarray(Image.open(out_dir / "reconstruction.png")).astype(int)  # the VAE image of the input
    assert edited.shape == source.shape == (64, 64, 3) and np.abs(edited - source).mean() > 1
    assert (out_dir / "grid.png").is_file()


def test_flow_models_refuse_prompt_to_prompt_and_others_refuse_flowedit_in_one_line(photo_file, tmp_path):
    common = [f"image={photo_file}", f"caption={SOURCE}", f"prompts=[{TARGET}]"]
    cases = [
        (["model=tiny_sd3"], SettingError, "this is a sd3 model: edit it with FlowEdit (inversion-free): mode=flowedit"),
        (["model=tiny_flux", "mode=sdedit"], SettingError, "this is a flux model: edit it with FlowEdit"),
        (["model=tiny", "mode=flowedit"], SettingError, "mode=flowedit (FlowEdit) runs on SD3 and FLUX models only, this is a sd model"),
    ]
    for overrides, error_type, message in cases:
        with composed("edit", [*common, *overrides], tmp_path / "c") as cfg:
            with pytest.raises(error_type) as error:
                check_edit(cfg)
        assert message in str(error.value) and "\n" not in str(error.value)
    with composed("edit", ["model=tiny_sd3", f"caption={SOURCE}", f"prompts=[{TARGET}]", "mode=flowedit"], tmp_path / "d") as cfg:
        with pytest.raises(EditError, match="FlowEdit.*edits the image itself, without an inversion: give image=<file>"):
            check_edit(cfg)


def test_flowedit_takes_an_artifacts_caption_model_and_sampler_and_prompt_to_prompt_refuses_it(photo_file, tmp_path):
    run_dir = tmp_path / "run"
    with composed("config", ["model=tiny_sd3", "inversion=uniinv", "diffusion.num_inference_steps=3", "data.limit=1", "logger=csv"], run_dir) as cfg:
        image_id = run_inversion(cfg)["images"][0]["id"]
    artifact = f"artifact={run_dir / 'inversions' / (image_id + '.safetensors')}"
    with composed("edit", [artifact, f"image={photo_file}", f"prompts=[{TARGET}]", "mode=flowedit"], tmp_path / "edit") as cfg:
        metrics = run_edit(cfg)
    settings = json.loads((tmp_path / "edit" / "settings.json").read_text())
    caption = json.loads((run_dir / "inversions" / (image_id + ".json")).read_text())["prompt"]
    assert metrics["source_prompt"] == settings["source_prompt"] == caption != SOURCE
    assert settings["num_inference_steps"] == 3 and settings["edit"]["denoiser_evaluations"] == 3 * 4  # the artifact's sampler
    with composed("edit", [artifact, f"prompts=[{TARGET}]"], tmp_path / "p2p") as cfg:
        with pytest.raises(SettingError, match="this is a sd3 model: edit it with FlowEdit"):
            run_edit(cfg)
