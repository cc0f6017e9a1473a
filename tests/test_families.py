"""Model families (SDXL, SD3, FLUX) against diffusers' own pipelines and scheduler, on the tiny models.

These equalities are the evidence that real weights will work: the project's conditioning, denoiser
call and sampler, from a given z_T, give what the stock pipeline gives with the same latents,
prompts, steps and guidance.
"""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from helpers import assert_reconstruct_reproduces, composed
from nulltext.api import invert, load_pipeline
from nulltext.cli import prepare_inversion, run_inversion
from nulltext.diffusion import Diffusion
from nulltext.errors import ModelUnavailableError
from nulltext.families import unpack
from nulltext.methods import BDIAInversion, DirectInversion, EDICTInversion, FixedPointInversion, make_method
from nulltext.models import MODEL_CONFIG_DIR, ModelShape, load_pipeline as load_folder, model_shape, pipeline_shape
from nulltext.reconstruction import latent_errors, reconstruct
from nulltext.validation import SettingError

PROMPTS = ["a photo of a cat", "a red car on a street"]
STEPS = 4


@pytest.fixture(scope="module")
def pipes():
    """The tiny pipelines, built once per module (each in well under a second)."""
    return {
        "tiny_xl": load_pipeline("tiny_xl"),
        "tiny_sd3": load_pipeline("tiny_sd3"),
        "tiny_sd3_without_t5": load_pipeline("tiny_sd3", text_encoder_3=None),
        "tiny_flux": load_pipeline("tiny_flux"),
    }


def stock_latents(pipe, z_T: torch.Tensor, guidance: float) -> torch.Tensor:
    """The stock pipeline's final latents from ``z_T`` [B, C, h, w] (output_type="latent")."""
    b, c, h, w = z_T.shape
    side = w * pipe.vae_scale_factor
    common = dict(num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent", height=side, width=side)
    if isinstance(pipe, FluxPipeline):
        packed = FluxPipeline._pack_latents(z_T, b, c, h, w)
        out = pipe(PROMPTS, latents=packed, max_sequence_length=pipe.tokenizer_2.model_max_length, **common).images
        return FluxPipeline._unpack_latents(out, side, side, pipe.vae_scale_factor)
    if hasattr(pipe, "tokenizer_3"):
        length = pipe.tokenizer_3.model_max_length if pipe.tokenizer_3 is not None else 256
        return pipe(PROMPTS, latents=z_T, max_sequence_length=length, **common).images
    # SDXL with DDIM (eta 0), the sampler nulltext runs on the UNet families.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe(PROMPTS, latents=z_T, eta=0.0, **common).images


@pytest.mark.parametrize(
    "name, guidance",
    [("tiny_xl", 7.5), ("tiny_sd3", 7.0), ("tiny_sd3_without_t5", 7.0), ("tiny_flux", 3.5)],
)
def test_sampling_from_z_T_equals_the_stock_pipeline(pipes, name, guidance):
    pipe = pipes[name]
    diffusion = Diffusion(pipe, STEPS, guidance)
    z_T = torch.randn(2, pipe.vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = diffusion.encode_prompts(PROMPTS)
    ours = diffusion.sample(z_T, uncond.unsqueeze(1), cond.unsqueeze(1))[:, -1]
    expected = stock_latents(pipe, z_T, guidance)
    assert (expected - z_T).abs().mean() > 0.1  # the sampler moved the latents
    torch.testing.assert_close(ours, expected)  # float32 tolerances


def test_sdxl_conditioning_is_two_encoders_pooled_and_a_zero_null(pipes):
    pipe = pipes["tiny_xl"]
    diffusion = Diffusion(pipe, STEPS)
    context = diffusion.encode_text(PROMPTS)
    # 77 tokens of CLIP-L (32) and CLIP-G (48) side by side, then the pooled CLIP-G projection (48) padded to 80.
    assert context.shape == (2, 78, 80)
    sequence, pooled = unpack(context, 48)
    assert torch.equal(context[:, -1, 48:], torch.zeros(2, 32))
    prompt_embeds, _, pooled_embeds, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(sequence, prompt_embeds, atol=0, rtol=0)
    torch.testing.assert_close(pooled, pooled_embeds, atol=0, rtol=0)
    assert torch.equal(diffusion.null_text(), torch.zeros(1, 78, 80))  # force_zeros_for_empty_prompt


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux"])
def test_flow_steps_are_the_schedulers_and_invert_each_other(pipes, name):
    pipe = pipes[name]
    diffusion = Diffusion(pipe, STEPS, 1.0, "source")
    schedule = diffusion.schedule
    # The scheduler set up as each pipeline sets it up (StableDiffusion3Pipeline: its shift; FluxPipeline:
    # sigmas linspace(1, 1/S, S) shifted by mu for 64 px = 8x8 tokens of 2x2 latents).
    reference = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if name == "tiny_flux":
        reference.set_timesteps(STEPS, sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=calculate_shift(64, 256, 4096, 0.5, 1.15))
    else:
        reference.set_timesteps(STEPS)
    assert schedule.timesteps == tuple(reference.timesteps.tolist())
    context = diffusion.encode_text(PROMPTS[:1])
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(schedule.timesteps):
        z_t = torch.randn(1, 16, 16, 16, generator=g)
        with torch.no_grad():
            velocity = diffusion.model_output(z_t, t, context)
        z_next = schedule.denoise_step(velocity, t, z_t)
        torch.testing.assert_close(z_next, reference.step(velocity, reference.timesteps[i], z_t).prev_sample, atol=0, rtol=0)
        # One reverse-Euler step, re-implemented here: back up from sigma_{i+1} to sigma_i along the same velocity.
        up = schedule.invert_step(velocity, t, z_next)
        sigma, sigma_next = reference.sigmas[i].item(), reference.sigmas[i + 1].item()
        torch.testing.assert_close(up, z_next + (sigma - sigma_next) * velocity)
        torch.testing.assert_close(up, z_t, atol=2e-6, rtol=0)  # float precision
        assert (z_next - z_t).abs().max() > 1e-2


def test_flow_inversion_evaluates_the_velocity_where_the_step_starts(pipes):
    """inversion_timestep=source: the first inversion step reads the velocity at t = 0 (sigma 0), on z_0."""
    diffusion = Diffusion(pipes["tiny_sd3"], STEPS, 1.0, "source")
    assert [diffusion.schedule.source_timestep(t) for t in diffusion.timesteps] == [*diffusion.timesteps[1:], 0.0]
    z0 = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    cond = diffusion.encode_text(PROMPTS[:1])
    pivot = diffusion.ddim_inversion(z0, cond)
    with torch.no_grad():
        velocity = diffusion.model_output(z0, 0.0, cond)
    torch.testing.assert_close(pivot[:, 1], z0 + diffusion.schedule.sigmas[-2] * velocity)
    # The pivot ends near the noise level sigma_0 = 1: z_T is no longer z_0.
    assert (pivot[:, -1] - z0).abs().mean() > 0.1


@pytest.mark.parametrize("name", ["tiny_xl", "tiny_sd3", "tiny_flux"])
def test_a_saved_pipeline_loads_offline_as_its_family(pipes, name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = pipes[name]
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_folder(str(tmp_path / "pipe"), local_files_only=True)
    assert type(loaded) is type(pipe)
    assert all(not p.requires_grad for m in loaded.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    config = {"_target_": "nulltext.models.load_pipeline", "path": str(tmp_path / "pipe")}
    assert model_shape(config) == pipeline_shape(loaded) == pipeline_shape(pipe)
    ours, theirs = Diffusion(loaded, STEPS), Diffusion(pipe, STEPS)
    torch.testing.assert_close(ours.encode_text(PROMPTS), theirs.encode_text(PROMPTS), atol=0, rtol=0)
    z, t = torch.randn(1, pipe.vae.config.latent_channels, 16, 16), ours.timesteps[1]
    context = ours.encode_text(PROMPTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(ours.model_output(z, t, context), theirs.model_output(z, t, context), atol=0, rtol=0)
    if name == "tiny_sd3":  # model.t5=false: SD3 without its T5 encoder
        assert load_folder(str(tmp_path / "pipe"), local_files_only=True, t5=False).text_encoder_3 is None
    else:
        with pytest.raises(SettingError, match="only SD3 can run without its T5 encoder"):
            load_folder(str(tmp_path / "pipe"), local_files_only=True, t5=False)


def test_flux_refuses_latents_of_another_size_than_its_schedule(pipes):
    """FLUX shifts its schedule with the image's token count: 32 px latents on a 64 px schedule stop with one line."""
    diffusion = Diffusion(pipes["tiny_flux"], STEPS)
    context = diffusion.encode_text(PROMPTS[:1])
    with pytest.raises(SettingError, match="set up for 64 px images, these are 32 px"):
        diffusion.sample(torch.zeros(1, 16, 8, 8), context.unsqueeze(1), context.unsqueeze(1))
    assert Diffusion(pipes["tiny_flux"], STEPS, resolution=32).schedule.timesteps != diffusion.schedule.timesteps


def test_model_shapes_from_configs():
    """Read from the configs alone: the full-shape random models are never built here."""
    names = ("tiny_xl", "tiny_sd3", "tiny_flux", "sdxl_random", "sd3_random", "flux_random")
    shapes = {name: model_shape(OmegaConf.load(MODEL_CONFIG_DIR / f"{name}.yaml")) for name in names}
    # Image sides: multiples of the VAE factor (4 tiny, 8 real); SD3 patches 2x2 and FLUX packs 2x2: twice that.
    assert shapes == {
        "tiny_xl": ModelShape(4, 64, 999, "sdxl"),
        "tiny_sd3": ModelShape(8, 64, 1000, "sd3"),
        "tiny_flux": ModelShape(8, 64, 1000, "flux"),
        "sdxl_random": ModelShape(8, 1024, 999, "sdxl"),
        "sd3_random": ModelShape(16, 1024, 1000, "sd3"),
        "flux_random": ModelShape(16, 1024, 1000, "flux"),
    }


@pytest.mark.parametrize(
    "model, steps, guidance, timestep",
    [("tiny_xl", 50, 7.5, "target"), ("sdxl", 50, 7.5, "target"), ("sd3", 28, 7.0, "source"), ("tiny_sd3", 28, 7.0, "source"),
     ("flux_dev", 28, 3.5, "source"), ("tiny_flux", 28, 3.5, "source"), ("flux_schnell", 4, 0.0, "source")],
)
def test_model_configs_pick_their_family_sampler(model, steps, guidance, timestep, tmp_path):
    with composed("config", [f"model={model}"], tmp_path) as cfg:
        assert (cfg.diffusion.num_inference_steps, cfg.diffusion.guidance_scale, cfg.diffusion.inversion_timestep) == (steps, guidance, timestep)
    with composed("config", [f"model={model}", "diffusion=ddim50", "diffusion.num_inference_steps=3"], tmp_path) as cfg:
        assert cfg.diffusion.num_inference_steps == 3 and cfg.diffusion.guidance_scale == 7.5  # the command line wins


@pytest.mark.parametrize(
    "model, hub_id",
    [
        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("sd3", "stabilityai/stable-diffusion-3-medium-diffusers"),
        ("flux_dev", "black-forest-labs/FLUX.1-dev"),
        ("flux_schnell", "black-forest-labs/FLUX.1-schnell"),
    ],
)
def test_hub_models_not_in_the_cache_fail_in_one_line(model, hub_id, tmp_path):
    with composed("config", [f"model={model}", "inversion=vae"], tmp_path) as cfg:
        with pytest.raises(ModelUnavailableError, match=f"cannot load model '{hub_id}'.*hf download {hub_id}") as error:
            prepare_inversion(cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "model, method, message",
    [
        ("tiny_flux", "null_text", "does not run on flux models (it runs on: sd, sdxl, sd3); the methods for flux models are: vae, flow_inversion"),
        ("tiny_sd3", "ddim", "the methods for sd3 models are: vae, flow_inversion, null_text"),
        ("tiny_xl", "textual_inversion", "the methods for sdxl models are: vae, ddim, null_text, negative_prompt"),
        ("tiny", "flow_inversion", "does not run on sd models (it runs on: sd3, flux)"),
    ],
)
def test_methods_refuse_families_they_do_not_run_on(model, method, message, tmp_path):
    with composed("config", [f"model={model}", f"inversion={method}"], tmp_path) as cfg:
        with pytest.raises(SettingError, match=f"inversion={method} ") as error:
            prepare_inversion(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


# -- the methods of each family through the command line and the API ---------------------------------

# (model, method, settings, denoiser evaluations of the inversion, of the reconstruction), 4 steps. Counted
# in rows: guided steps run [uncond; cond] (2), w = 1 the conditional row alone, FLUX one row per step.
FAMILY_RUNS = [
    ("tiny_xl", "ddim", [], 4, 8),
    ("tiny_xl", "negative_prompt", [], 4, 8),
    ("tiny_xl", "null_text", ["inversion.num_inner_steps=2"], 4 + 4 * (1 + 2 + 1), 8),
    ("tiny_xl", "proximal_negative_prompt", [], 4, 8),
    ("tiny_xl", "direct_inversion", [], 4 + 8, 8),  # the pivot, then the offsets: one guided sampling run
    ("tiny_xl", "edict", [], 4 * 2 * 2, 4 * 2 * 2),  # two guided evaluations per step both ways
    ("tiny_xl", "bdia", [], 4 * 2, 3 * 2),  # one per state; sampling starts from the top two states
    ("tiny_xl", "fixed_point", ["inversion.num_iterations=2"], 4 * 2 * 2, 8),
    ("tiny_xl", "renoise", [], 4 * (2 + 1), 4),  # w = 1; two estimates and the regularisation's reference per step
    ("tiny_sd3", "flow_inversion", [], 4, 8),
    ("tiny_flux", "flow_inversion", [], 4, 4),
    *((model, "vae", [], 0, 0) for model in ("tiny_xl", "tiny_sd3", "tiny_flux")),  # the bound: decode(encode(x))
]
# Methods with no pivot (their own exact sampler, or none: the VAE bound): no per-step latent error.
NO_PIVOT = ("edict", "bdia", "vae")


@pytest.mark.parametrize("model, method, settings, inversion_evaluations, reconstruction_evaluations", FAMILY_RUNS)
def test_family_methods_write_complete_metrics_and_reusable_artifacts(
    model, method, settings, inversion_evaluations, reconstruction_evaluations, tmp_path
):
    run_dir = tmp_path / "run"
    overrides = [f"model={model}", f"inversion={method}", "diffusion.num_inference_steps=4", "data.limit=1", "logger=csv", *settings]
    with composed("config", overrides, run_dir) as cfg:
        metrics = run_inversion(cfg)
    assert (metrics["method"], metrics["model"], metrics["num_images"], metrics["num_failed"]) == (method, model, 1, 0)
    for key in ("psnr_mean", "lpips_mean", "ssim_mean", "vae_psnr_mean", "seconds_mean", "peak_memory_mib_mean"):
        assert np.isfinite(metrics[key]), key
    image = metrics["images"][0]
    assert (image["inversion_unet_evaluations"], image["reconstruction_unet_evaluations"]) == (inversion_evaluations, reconstruction_evaluations)
    if method not in NO_PIVOT:
        assert len(image["latent_error"]["mse"]) == 5 and image["latent_error"]["mse"][0] == 0.0
    assert_reconstruct_reproduces(run_dir, image["id"], tmp_path / "rec")


@pytest.mark.parametrize("model, steps, guidance", [("tiny_sd3", 28, 7.0), ("tiny_flux", 28, 3.5), ("tiny_xl", 50, 7.5)])
def test_the_api_samples_as_the_command_line_does_for_each_family(model, steps, guidance, pipes, sample_images, tmp_path):
    """api.invert's defaults are the sampler the family's model configs pick: flow_inversion through the API
    and through the command line give the same z_T (SD3 and FLUX invert with the velocity at the source level)."""
    photo = sample_images[0]
    method = "ddim" if model == "tiny_xl" else "flow_inversion"
    result = invert(pipes[model], Image.fromarray(photo.permute(1, 2, 0).numpy()), "a photo", method=method)
    assert (len(result.inversion.pivot[0]), result.inversion.guidance_scale) == (steps + 1, guidance)
    with composed("config", [f"model={model}", f"inversion={method}", "data.limit=1", "logger=csv"], tmp_path) as cfg:
        assert (cfg.diffusion.num_inference_steps, cfg.diffusion.guidance_scale) == (steps, guidance)
        diffusion = instantiate(cfg.diffusion, pipe=pipes[model])
    z0 = diffusion.encode_images(photo[None])
    expected = make_method(method).invert(diffusion, z0, ["a photo"], [0]).z_T
    torch.testing.assert_close(result.z_T, expected[0], rtol=0, atol=1e-5)


def test_renoise_sdxl_experiment_is_the_papers_table_1_setting(tmp_path):
    """experiment=renoise_sdxl: SDXL, 20/20 DDIM steps, 3 renoising iterations, w = 1, fp16 UNet (ReNoise
    Table 1's best row); on tiny_xl each step evaluates 1 + 3 estimates plus the regularisation's reference."""
    with composed("config", ["experiment=renoise_sdxl"], tmp_path / "composed") as cfg:
        assert (cfg.model.path, cfg.model.dtype) == ("stabilityai/stable-diffusion-xl-base-1.0", "fp16")
        assert (cfg.diffusion.num_inference_steps, cfg.inversion.num_renoise_steps, cfg.inversion.guidance_scale) == (20, 3, 1.0)
    run_dir = tmp_path / "run"
    with composed("config", ["experiment=renoise_sdxl", "model=tiny_xl", "data=samples", "data.limit=1", "logger=csv"], run_dir) as cfg:
        metrics = run_inversion(cfg)
    image = metrics["images"][0]
    assert (image["inversion_unet_evaluations"], image["reconstruction_unet_evaluations"]) == (20 * (1 + 3) + 20, 20)
    assert metrics["num_failed"] == 0 and np.isfinite(metrics["psnr_mean"])
    assert_reconstruct_reproduces(run_dir, image["id"], tmp_path / "rec")


def test_sdxl_null_text_optimises_the_null_and_the_pooled_null_of_every_step(pipes, sample_images):
    pipe = pipes["tiny_xl"]
    photo = Image.fromarray(sample_images[0].permute(1, 2, 0).numpy())
    errors = {}
    for method, options in (("ddim", {}), ("null_text", {"num_inner_steps": 5})):
        result = invert(pipe, photo, "a photo", method=method, num_inference_steps=4, **options)
        trajectory = reconstruct(Diffusion(pipe, 4), result.inversion).trajectory
        errors[method] = latent_errors(trajectory, result.inversion.pivot)[0]
    nulls = result.null_embeddings  # [4 steps, 77 tokens + the pooled row, 80]
    assert nulls.shape == (4, 78, 80) and result.metrics["iterations"] == 20
    sequence, pooled = unpack(nulls, 48)
    # Both start at SDXL's zero null; both moved, step by step (warm-started, so each step's differs).
    assert (sequence.abs().amax(dim=(1, 2)) > 1e-3).all() and (pooled.abs().amax(dim=1) > 1e-3).all()
    assert not torch.allclose(pooled[0], pooled[-1])
    assert torch.equal(nulls[:, -1, 48:], torch.zeros(4, 32))  # the padding gets no gradient
    # The optimisation closes part of the guided sampling's gap to the pivot at every step.
    assert (errors["null_text"][1:] < errors["ddim"][1:]).all()


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def xl_latents(pipes, sample_images):
    return Diffusion(pipes["tiny_xl"], 5).encode_images(sample_images[:2])


def test_sdxl_direct_inversion_retraces_the_pivot_at_every_step(pipes, xl_latents):
    """As on SD (tests/test_pnp_methods.py), in float64 so that what is left is rounding."""
    diffusion = Diffusion(copy.deepcopy(pipes["tiny_xl"]).to(torch.float64), 5, 7.5)
    z0 = xl_latents.double()
    inversion = DirectInversion().invert(diffusion, z0, PROMPTS, [0, 1])
    trajectory = DirectInversion.reconstruct(diffusion, inversion, 7.5)
    pivot = inversion.pivot.flip(1)  # index i: the level after i sampling steps
    for i in range(6):
        assert relative(trajectory[:, i], pivot[:, i]) < 1e-10, f"step {i}"
    # Without the offsets, guided sampling leaves the pivot (the test above can fail).
    assert relative(diffusion.sample(inversion.z_T, inversion.uncond, inversion.cond)[:, -1], z0) > 0.05


@pytest.mark.parametrize("method, tolerance", [(EDICTInversion(), 1e-8), (BDIAInversion(gamma=0.9), 1e-10)], ids=["edict", "bdia"])
def test_sdxl_exact_methods_in_float64_return_the_latents(pipes, xl_latents, method, tolerance):
    """As on SD (tests/test_exact_methods.py): inversion then the method's own sampler returns z_0."""
    diffusion = Diffusion(pipes["tiny_xl"], 5)
    inversion = method.invert(diffusion, xl_latents, PROMPTS, [0, 1])
    assert inversion.z_T.dtype == torch.float64 and inversion.uncond.shape == (2, 1, 78, 80)  # the pooled row rides along
    assert relative(inversion.z_T, xl_latents.double()) > 0.1, "z_T is noise, not the input"
    trajectory = type(method).reconstruct(diffusion, inversion, inversion.guidance_scale)
    # Rounding, amplified by the inverse: the random tiny_xl UNet at w = 7 is steeper than tiny SD's, and
    # EDICT in float32 ends 0.16 away here; float64 ends 2^-29 of that (3e-10), hence 1e-8 and not SD's 1e-10.
    assert relative(trajectory[:, -1], xl_latents.double()) < tolerance
    assert diffusion.unet.dtype == torch.float32, "the UNet is back in float32"


def test_sdxl_fixed_point_iterations_lower_the_implicit_step_residual(pipes, xl_latents):
    """As on SD (tests/test_fixed_point.py): 20 steps of the w = 1 pivot, 1, 3 and 10 iterations per step."""
    diffusion = Diffusion(pipes["tiny_xl"], 20)
    cond = diffusion.encode_text(PROMPTS[:1])
    uncond = diffusion.null_text().expand_as(cond)
    pivot = diffusion.ddim_inversion(xl_latents[:1], cond)
    residuals = {1: [], 3: [], 10: []}
    for k in (6, 12, 18):  # inversion step k: pivot[k] -> level timesteps[-1 - k]
        t, z_s = diffusion.timesteps[-1 - k], pivot[:, k]
        for iterations, found in residuals.items():
            z_t = FixedPointInversion(num_iterations=iterations, inversion_guidance_scale=1.0).solve(diffusion, z_s, t, uncond, cond, {})
            back = diffusion.schedule.denoise_step(diffusion.guided_output(z_t, t, uncond, cond, 1.0), t, z_t)
            found.append(relative(back, z_s))  # zero for the exact inverse of the sampling step
    assert min(residuals[1]) > 1e-2, "DDIM inversion's own residual is not negligible on the tiny model"
    for few, many in zip(residuals[1], residuals[3]):
        assert many < few / 2, residuals
    for few, many in zip(residuals[3], residuals[10]):
        assert many < few / 10, residuals


def test_editing_refuses_other_families_in_one_line(tmp_path):
    """Prompt-to-Prompt is ported to SD 1/2 and SDXL only: an SD3 artifact, or a FLUX model to invert first, stops with one line that names FlowEdit."""
    from nulltext.editing.cli import check_edit, run_attention, run_edit

    run_dir = tmp_path / "run"
    with composed("config", ["model=tiny_sd3", "inversion=flow_inversion", "diffusion.num_inference_steps=2", "data.limit=1", "logger=csv"], run_dir) as cfg:
        image_id = run_inversion(cfg)["images"][0]["id"]
    artifact = f"artifact={run_dir / 'inversions' / (image_id + '.safetensors')}"
    for app, run, overrides in (("edit", run_edit, [artifact, "prompts=[a dog]"]), ("attention", run_attention, [artifact])):
        with composed(app, overrides, tmp_path / app) as cfg:
            with pytest.raises(SettingError, match="Prompt-to-Prompt, SDEdit and the attention maps run on SD 1.x/2.x and SDXL models, this is a sd3 model: edit it with FlowEdit"):
                run(cfg)
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    with composed("edit", ["model=tiny_flux", f"image={image}", "caption=a cat", "prompts=[a dog]"], tmp_path / "image") as cfg:
        with pytest.raises(SettingError, match="this is a flux model"):
            check_edit(cfg)


def test_the_api_checks_the_family_and_inverts_with_flow(pipes, sample_images):
    photo = Image.fromarray(sample_images[0].permute(1, 2, 0).numpy())
    with pytest.raises(SettingError, match="inversion=null_text does not run on flux models"):
        invert(pipes["tiny_flux"], photo, "a photo", method="null_text")
    result = invert(pipes["tiny_flux"], photo, "a photo", method="flow_inversion", num_inference_steps=3, guidance_scale=3.5)
    assert result.z_T.shape == (16, 16, 16) and result.reconstruction.size == (64, 64)
    assert result.inversion.pivot.shape == (1, 4, 16, 16, 16)
