"""RF-Inversion, RF-Solver and FireFlow on the tiny SD3 and FLUX models.

Each method's inversion and sampler equal a transcription of its official code's loop written here
(official file and lines cited at each); the round-trip properties their papers claim are checked
where the tiny models show them; each runs through the command line with complete metrics and an
artifact that ``nulltext reconstruct`` reproduces bit for bit.
"""

import numpy as np
import pytest
import torch

from helpers import assert_reconstruct_reproduces, composed
from nulltext.api import load_pipeline
from nulltext.cli import run_inversion
from nulltext.cost import UNetCounter
from nulltext.diffusion import Diffusion
from nulltext.methods import FireFlowInversion, FlowInversion, RFInversion, RFSolverInversion
from nulltext.validation import SettingError

STEPS = 4
GUIDANCE = {"tiny_sd3": 7.0, "tiny_flux": 3.5}
PROMPT = ["a photo of a cat"]


@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(name) for name in GUIDANCE}


@pytest.fixture(params=list(GUIDANCE))
def setup(request, pipes):
    """(diffusion at the model's sampler settings, 4 steps; z_0; psi(caption); psi(""))."""
    diffusion = Diffusion(pipes[request.param], STEPS, GUIDANCE[request.param], "source")
    z0 = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    cond, null = diffusion.encode_prompts(PROMPT)
    return diffusion, z0, cond, null


def official_model(diffusion, context, null, guidance):
    """The official codes' ``model(img, t)`` with t in sigma units (BFL's Flux scales it by 1000 inside)."""
    return lambda img, t: diffusion.guided_output(img, 1000 * t, null, context, guidance)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def rf_solver_official(model, img, timesteps, inverse):
    """wangjiangshan0725/RF-Solver-Edit@ccb2d211 FLUX_Image_Edit/src/flux/sampling.py:94-134 (``denoise``), its order of operations."""
    if inverse:
        timesteps = timesteps[::-1]
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        pred = model(img, t_curr)
        img_mid = img + (t_prev - t_curr) / 2 * pred
        pred_mid = model(img_mid, t_curr + (t_prev - t_curr) / 2)
        first_order = (pred_mid - pred) / ((t_prev - t_curr) / 2)
        img = img + (t_prev - t_curr) * pred + 0.5 * (t_prev - t_curr) ** 2 * first_order
    return img


def fireflow_official(model, img, timesteps, inverse):
    """cyteena/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing@313f2475 src/flux/sampling.py:202-246 (``denoise_fireflow``)."""
    if inverse:
        timesteps = timesteps[::-1]
    next_step_velocity = None
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        pred = model(img, t_curr) if next_step_velocity is None else next_step_velocity
        img_mid = img + (t_prev - t_curr) / 2 * pred
        pred_mid = model(img_mid, t_curr + (t_prev - t_curr) / 2)
        next_step_velocity = pred_mid
        img = img + (t_prev - t_curr) * pred_mid
    return img


@pytest.mark.parametrize(
    "cls, official, evaluations",
    [(RFSolverInversion, rf_solver_official, 2 * STEPS), (FireFlowInversion, fireflow_official, STEPS + 1)],
    ids=["rf_solver", "fireflow"],
)
def test_midpoint_solvers_equal_the_official_loops_both_ways(setup, cls, official, evaluations):
    diffusion, z0, cond, null = setup
    sigmas = list(diffusion.schedule.sigmas)  # get_schedule's list: 1 ... 0, S + 1 entries
    with UNetCounter(diffusion.unet) as inversion_calls:
        inversion = cls().invert(diffusion, z0, PROMPT, [0])
    # The official inversion: guidance input 1 (edit.py), the source prompt.
    expected_z_T = official(official_model(diffusion, cond, null, 1.0), z0, sigmas, inverse=True)
    torch.testing.assert_close(inversion.z_T, expected_z_T, rtol=1e-5, atol=1e-5)
    assert relative(inversion.z_T, z0) > 0.5  # z_T is noise-like, not the input
    w = diffusion.guidance_scale
    with UNetCounter(diffusion.unet) as reconstruction_calls:
        trajectory = cls.reconstruct(diffusion, inversion, w)
    expected = official(official_model(diffusion, cond, null, w), inversion.z_T, sigmas, inverse=False)
    torch.testing.assert_close(trajectory[:, -1], expected, rtol=1e-5, atol=1e-5)
    # Model evaluations: RF-Solver 2 per step, FireFlow 1 per step and one more; SD3's guided sampling 2 rows each.
    rows = 1 if diffusion.family.name == "flux" else 2
    assert (inversion_calls.rows, reconstruction_calls.rows) == (evaluations, rows * evaluations)


def test_rf_inversion_equals_the_community_pipeline_both_ways(setup):
    diffusion, z0, cond, null = setup
    gamma, eta, start, stop = 0.5, 0.9, 0.0, 0.6  # stop 0.6 of 4 steps: steps 0 and 1 controlled, 2 and 3 not
    with UNetCounter(diffusion.unet) as calls:
        inversion = RFInversion(gamma=gamma, eta=eta, start_timestep=start, stop_timestep=stop).invert(diffusion, z0, PROMPT, [11])
    assert calls.rows == STEPS
    # huggingface/diffusers@0036ae2a examples/community/pipeline_flux_rf_inversion.py, RFInversionFluxPipeline.invert,
    # the loop after "# Eq 8": source prompt "" at guidance 0, noise y_1 (here the image's seeded draw).
    sigmas = diffusion.schedule.sigmas
    Y_t = z0
    y_1 = torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(11))[None]
    N = len(sigmas)
    for i in range(N - 1):
        t_i = i / N
        u_t_i = diffusion.model_output(Y_t, 1000 * t_i, null, 0.0)
        u_t_i_cond = (y_1 - Y_t) / (1 - t_i)
        u_hat_t_i = u_t_i + gamma * (u_t_i_cond - u_t_i)
        Y_t = Y_t + u_hat_t_i * (sigmas[i] - sigmas[i + 1])
    torch.testing.assert_close(inversion.z_T, Y_t, rtol=1e-5, atol=1e-5)
    # The same file, RFInversionFluxPipeline.__call__, the denoising loop's `if do_rf_inversion` branches.
    y_0, latents, w = z0, inversion.z_T, diffusion.guidance_scale
    start_timestep, stop_timestep = int(start * STEPS), min(int(stop * STEPS), STEPS)
    for i, t in enumerate(diffusion.timesteps):
        t_i = 1 - t / 1000
        noise_pred = diffusion.guided_output(latents, t, null, cond, w)
        v_t = -noise_pred
        v_t_cond = (y_0 - latents) / (1 - t_i)
        v_hat_t = v_t + eta * (v_t_cond - v_t) if start_timestep <= i < stop_timestep else v_t
        latents = latents + v_hat_t * (sigmas[i] - sigmas[i + 1])
    with UNetCounter(diffusion.unet) as calls:
        trajectory = RFInversion.reconstruct(diffusion, inversion, w)
    torch.testing.assert_close(trajectory[:, -1], latents, rtol=1e-5, atol=1e-5)
    assert calls.rows == STEPS * (1 if diffusion.family.name == "flux" else 2)


def test_rf_solver_and_fireflow_reconstruct_far_better_than_plain_flow_inversion(setup):
    """Both papers' claim against the reverse-Euler baseline, at w = 1 both ways and the same 4 steps.

    Measured (relative error of z_0): flow inversion 0.12 (tiny_sd3) / 0.095 (tiny_flux); RF-Solver
    4.5e-3 / 2.7e-3; FireFlow 7.0e-3 / 2.7e-3. FireFlow's own claim, second order at the cost of
    first: its 8 steps (9 evaluations) reconstruct better than RF-Solver's 4 (8 evaluations).
    """
    diffusion, z0, _, _ = setup
    errors = {}
    for cls in (FlowInversion, RFSolverInversion, FireFlowInversion):
        inversion = cls().invert(diffusion, z0, PROMPT, [0])
        errors[cls.name] = relative(cls.reconstruct(diffusion, inversion, 1.0)[:, -1], z0)
    assert errors["flow_inversion"] > 0.05
    assert errors["rf_solver"] < errors["flow_inversion"] / 10 and errors["fireflow"] < errors["flow_inversion"] / 10, errors
    eight = Diffusion(diffusion.pipe, 2 * STEPS, diffusion.guidance_scale, "source")
    fireflow = FireFlowInversion().invert(eight, z0, PROMPT, [0])
    assert relative(FireFlowInversion.reconstruct(eight, fireflow, 1.0)[:, -1], z0) < errors["rf_solver"]


def test_rf_inversion_controllers_trade_noise_for_faithfulness(setup):
    """gamma pulls z_T to the noise sample y_1; eta pulls the reconstruction to the image (the paper's trade-off).

    With eta = 1 on every step the reconstruction is y_0 = z_0 whatever z_T (z_{i+1} - y_0 = (z_i - y_0)
    sigma_{i+1} / sigma_i, and sigma_S = 0): measured 3e-11 (tiny_sd3) and 7e-9 (tiny_flux).
    """
    diffusion, z0, _, _ = setup
    y_1 = torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(5))[None]
    to_noise = [relative(RFInversion(gamma=gamma).invert(diffusion, z0, PROMPT, [5]).z_T, y_1) for gamma in (0.0, 0.5, 1.0)]
    assert to_noise[0] > to_noise[1] > to_noise[2], to_noise
    errors = []
    for eta in (0.0, 0.5, 0.9, 1.0):
        method = RFInversion(eta=eta, stop_timestep=0.5)
        errors.append(relative(RFInversion.reconstruct(diffusion, method.invert(diffusion, z0, PROMPT, [5]), diffusion.guidance_scale)[:, -1], z0))
    assert errors == sorted(errors, reverse=True) and errors[0] - errors[-1] > 0.1, errors
    exact = RFInversion(eta=1.0, stop_timestep=1.0)
    assert relative(RFInversion.reconstruct(diffusion, exact.invert(diffusion, z0, PROMPT, [5]), diffusion.guidance_scale)[:, -1], z0) < 1e-6


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"eta": 1.5}, "inversion.eta=1.5 is not allowed: a finite number >= 0.0 and <= 1.0"),
        ({"start_timestep": 0.5, "stop_timestep": 0.25}, "inversion.stop_timestep=0.25 is before inversion.start_timestep=0.5"),
    ],
)
def test_rf_inversion_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(SettingError, match=message) as error:
        RFInversion(**settings)
    assert "\n" not in str(error.value)


# (model, method, denoiser evaluations of the inversion, of the reconstruction), 4 steps; SD3 samples with
# guidance, 2 rows per evaluation; the inversions run one row (w = 1, or RF-Inversion's empty prompt).
CLI_RUNS = [
    ("tiny_sd3", "rf_inversion", 4, 8),
    ("tiny_flux", "rf_inversion", 4, 4),
    ("tiny_sd3", "rf_solver", 8, 16),
    ("tiny_flux", "rf_solver", 8, 8),
    ("tiny_sd3", "fireflow", 5, 10),
    ("tiny_flux", "fireflow", 5, 5),
]


@pytest.mark.parametrize("model, method, inversion_evaluations, reconstruction_evaluations", CLI_RUNS)
def test_flow_methods_write_complete_metrics_and_reusable_artifacts(model, method, inversion_evaluations, reconstruction_evaluations, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"model={model}", f"inversion={method}", f"diffusion.num_inference_steps={STEPS}", "data.limit=1", "logger=csv"]
    with composed("config", overrides, run_dir) as cfg:
        metrics = run_inversion(cfg)
    assert (metrics["method"], metrics["model"], metrics["num_images"], metrics["num_failed"]) == (method, model, 1, 0)
    for key in ("psnr_mean", "lpips_mean", "ssim_mean", "vae_psnr_mean", "seconds_mean", "peak_memory_mib_mean"):
        assert np.isfinite(metrics[key]), key
    image = metrics["images"][0]
    assert (image["inversion_unet_evaluations"], image["reconstruction_unet_evaluations"]) == (inversion_evaluations, reconstruction_evaluations)
    # The latent error against the method's own inversion trajectory; the sampler starts on its top.
    assert len(image["latent_error"]["mse"]) == STEPS + 1 and image["latent_error"]["mse"][0] == 0.0
    if method != "rf_inversion":
        assert np.isfinite(image["psnr_w1"])
    assert_reconstruct_reproduces(run_dir, image["id"], tmp_path / "rec")
