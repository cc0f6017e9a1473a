"""Per-step null-text inversion against a straightforward re-implementation of ALGORITHM.md section 4.

The reference below is written independently of nulltext's engine: one image, diffusers'
``DDIMInverseScheduler`` for the pivot and ``DDIMScheduler.step`` for every denoising step, a plain
Adam per timestep, the loop exactly as the specification lists it.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler

from nulltext.diffusion import Diffusion
from nulltext.methods import NullTextInversion
from nulltext.reconstruction import reconstruct

STEPS = 8
GUIDANCE = 7.5


def reference_null_text(pipe, z0, prompt, num_inner_steps, epsilon, slope=2e-5):
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config, steps_offset=1)
    inverse.set_timesteps(STEPS)

    def embed(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    def eps(z, t, context):
        return pipe.unet(z, t, encoder_hidden_states=context).sample

    with torch.no_grad():
        cond, null = embed(prompt), embed("")
        pivot = [z0]
        for t in inverse.timesteps:  # 1, 1 + k, ...: eps on the source latent at the target timestep
            pivot.append(inverse.step(eps(pivot[-1], t, cond), t, pivot[-1]).prev_sample)
    z_bar, nulls, iterations = pivot[-1], [], 0
    for i, t in enumerate(scheduler.timesteps):
        null = null.clone().detach().requires_grad_(True)
        optimizer = torch.optim.Adam([null], lr=1e-2 * (1.0 - i / 100.0))
        target = pivot[len(pivot) - 2 - i]
        with torch.no_grad():
            eps_c = eps(z_bar, t, cond)
        for _ in range(num_inner_steps):
            eps_u = eps(z_bar, t, null)
            z_prev = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, z_bar).prev_sample
            loss = F.mse_loss(z_prev, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iterations += 1
            if loss.item() < epsilon + slope * i:
                break
        nulls.append(null.detach())
        with torch.no_grad():
            eps_u = eps(z_bar, t, null)
            z_bar = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, z_bar).prev_sample
    return torch.cat(nulls), z_bar, iterations


def assert_float32_noise(actual, expected, rel=1e-4):
    """Equal up to float32 rounding as Adam amplifies it.

    Adam divides by sqrt(v) + 1e-8, so an element whose gradient is ~0 moves by about +-lr per step
    on the sign of rounding noise: a few such elements may differ by a few steps (lr = 0.01);
    the whole must agree to ``rel`` in norm.
    """
    diff = (actual - expected).abs()
    assert (diff.norm() / expected.norm()).item() < rel
    assert diff.max().item() < 0.05


@pytest.fixture(scope="module")
def latents(tiny_pipe, sample_images):
    diffusion = Diffusion(tiny_pipe, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    return diffusion, diffusion.encode_images(sample_images[:3])


PROMPTS = ["an astronaut with a helmet", "a cat lying down", "a cup of coffee"]


@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
def test_per_step_null_text_equals_reference(tiny_pipe, latents, epsilon):
    diffusion, z0 = latents
    method = NullTextInversion(num_inner_steps=4, early_stop_epsilon=epsilon)
    with torch.enable_grad():
        inversion = method.invert(diffusion, z0[:1], PROMPTS[:1], [0])
        ref_nulls, ref_final, ref_iterations = reference_null_text(tiny_pipe, z0[:1], PROMPTS[0], 4, epsilon)
    assert inversion.iterations == [ref_iterations]
    assert_float32_noise(inversion.uncond[0], ref_nulls)
    recon = reconstruct(diffusion, inversion)
    assert_float32_noise(recon.latents, ref_final)
    # The reconstruction differs from the pivot's start: the test compares a non-trivial result.
    assert (recon.latents - z0[:1]).abs().max() > 1e-3


def test_early_stop_counts_differ_per_image_and_batching_does_not_matter(latents):
    diffusion, z0 = latents
    method = NullTextInversion(num_inner_steps=4, early_stop_epsilon=0.05)
    with torch.enable_grad():
        batched = method.invert(diffusion, z0, PROMPTS, [0, 1, 2])
        singles = [method.invert(diffusion, z0[b : b + 1], PROMPTS[b : b + 1], [b]) for b in range(3)]
    assert batched.iterations == [s.iterations[0] for s in singles]
    assert len(set(batched.iterations)) > 1, "the threshold should stop images at different iterations"
    for b, single in enumerate(singles):
        # A different batch size changes the GEMM blocking, hence the rounding that Adam amplifies.
        assert_float32_noise(batched.uncond[b], single.uncond[0], rel=1e-3)
        assert_float32_noise(batched.z_T[b], single.z_T[0])
    batched_latents = reconstruct(diffusion, batched).latents
    for b, single in enumerate(singles):
        assert_float32_noise(batched_latents[b], reconstruct(diffusion, single).latents[0], rel=1e-3)
