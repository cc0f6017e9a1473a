"""The reference engine (the official loop as written) against the fast engine, and its side effects.

``OfficialNullTextInversion`` is the baseline of every speed figure (scripts/bench.py): it must
compute the same thing as the batched, frozen, SDPA ``NullTextInversion`` (up to float32 rounding
as Adam amplifies it), really run with unfrozen weights and explicit attention, and leave the
pipeline exactly as it found it.
"""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from nulltext.diffusion import Diffusion
from nulltext.methods import METHODS, NullTextInversion, OfficialNullTextInversion
from nulltext.reconstruction import reconstruct

STEPS = 6
INNER = 3
PROMPTS = ["an astronaut with a helmet", "a cat lying down"]


def assert_float32_noise(actual, expected, rel=1e-3):
    """Equal up to float32 rounding as Adam amplifies it (see tests/test_null_text.py)."""
    diff = (actual - expected).abs()
    assert (diff.norm() / expected.norm()).item() < rel
    assert diff.max().item() < 0.05


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def latents(tiny_pipe, sample_images):
    diffusion = Diffusion(tiny_pipe, num_inference_steps=STEPS, guidance_scale=7.5)
    return diffusion, diffusion.encode_images(sample_images[:2])


def unet_call_recorder(unet):
    """A forward hook recording, per UNet call: batch, grad mode, weight state and attention class."""
    calls = []
    weight = unet.conv_in.weight

    def hook(module, args, kwargs, output):
        attn = next(m for m in module.modules() if hasattr(m, "processor"))
        calls.append(
            {
                "batch": output.sample.shape[0],
                "grad_enabled": torch.is_grad_enabled(),
                "requires_grad": weight.requires_grad,
                "weight_grad": weight.grad is not None,
                "processor": type(attn.processor),
            }
        )

    return calls, unet.register_forward_hook(hook, with_kwargs=True)


# epsilon -1: never stops (every step takes N iterations); 1.0: on the tiny model the two images
# stop at different iterations, so per-image early stopping is compared too. Every float32 form of
# the fast engine: stopped images dropped from the batch (default) or masked in a static batch,
# eager or compiled (the compiled UNet is built once, ~1 min on a 2-core CPU).
@pytest.mark.parametrize(
    "epsilon, engine",
    [
        (-1.0, {}),
        (1.0, {}),
        (-1.0, {"static_batch": True}),
        (1.0, {"static_batch": True}),
        (1.0, {"static_batch": True, "compile": "default"}),
    ],
    ids=["early-stop-off", "early-stop-on", "static-early-stop-off", "static-early-stop-on", "static-compiled"],
)
def test_fast_engine_equals_reference(latents, epsilon, engine):
    diffusion, z0 = latents
    settings = {"num_inner_steps": INNER, "early_stop_epsilon": epsilon}
    fast = NullTextInversion(**settings, **engine).invert(diffusion, z0, PROMPTS, [0, 1])
    ref = OfficialNullTextInversion(**settings).invert(diffusion, z0, PROMPTS, [0, 1])
    assert fast.iterations == ref.iterations
    if epsilon < 0:
        assert ref.iterations == [STEPS * INNER] * 2
    else:
        assert len(set(ref.iterations)) == 2 and max(ref.iterations) < STEPS * INNER
    assert ref.uncond.shape == fast.uncond.shape == (2, STEPS, 77, 32)
    assert ref.cond.shape == fast.cond.shape and ref.prompts == fast.prompts
    assert_float32_noise(ref.cond, fast.cond, rel=1e-5)  # per image vs batched text encoder: rounding only
    assert_float32_noise(ref.pivot, fast.pivot, rel=1e-4)
    for b in range(2):
        assert_float32_noise(fast.uncond[b], ref.uncond[b])
    fast_latents, ref_latents = reconstruct(diffusion, fast).latents, reconstruct(diffusion, ref).latents
    for b in range(2):
        assert_float32_noise(fast_latents[b], ref_latents[b])
    # A non-trivial comparison: the optimisation moved the embeddings away from psi("").
    null = diffusion.encode_text([""])[0]
    assert (ref.uncond[:, -1] - null).abs().max() > 1e-2


def test_fast_engine_equals_reference_on_the_offline_model():
    """The same equality on the shipped offline model (trained weights, not random ones), on two
    held-out scenes with their captions, every iteration done by both engines."""
    from nulltext.models import pipeline_resolution
    from nulltext.pocket import load_pocket
    from nulltext.scenes import ScenesDataset

    pipe = load_pocket()
    diffusion = Diffusion(pipe, num_inference_steps=STEPS, guidance_scale=7.5)
    data = ScenesDataset(pipeline_resolution(pipe), num_images=2, seed=3, split="heldout")
    captions = [data[i]["caption"] for i in range(2)]
    z0 = diffusion.encode_images(torch.stack([data[i]["image"] for i in range(2)]))
    settings = {"num_inner_steps": INNER, "early_stop_epsilon": -1.0}
    fast = NullTextInversion(**settings).invert(diffusion, z0, captions, [0, 1])
    ref = OfficialNullTextInversion(**settings).invert(diffusion, z0, captions, [0, 1])
    assert fast.iterations == ref.iterations == [STEPS * INNER] * 2
    assert_float32_noise(ref.pivot, fast.pivot, rel=1e-4)
    fast_latents, ref_latents = reconstruct(diffusion, fast).latents, reconstruct(diffusion, ref).latents
    for b in range(2):
        assert_float32_noise(fast.uncond[b], ref.uncond[b])
        assert_float32_noise(fast_latents[b], ref_latents[b])
    null = diffusion.encode_text([""])[0]
    assert (ref.uncond[:, -1] - null).abs().max() > 1e-2


def test_reference_runs_unfrozen_with_explicit_attention_and_restores_the_pipeline(latents):
    diffusion, z0 = latents
    unet = diffusion.unet
    before_processors = dict(unet.attn_processors)
    params = [p for m in (unet, diffusion.vae, diffusion.text_encoder) for p in m.parameters()]
    before_flags = [p.requires_grad for p in params]
    assert not any(before_flags), "the fixture pipeline is frozen"
    # A mixed state must come back as it was too: unfreeze one weight for the duration of the test.
    probe = unet.conv_out.bias
    probe.requires_grad_(True)
    calls, handle = unet_call_recorder(unet)
    try:
        with torch.no_grad():  # the reference turns autograd on where the official code has it
            inversion = OfficialNullTextInversion(num_inner_steps=INNER, early_stop_epsilon=-1.0).invert(
                diffusion, z0[:1], PROMPTS[:1], [0]
            )
        assert probe.requires_grad and probe.grad is None
    finally:
        handle.remove()
        probe.requires_grad_(False)
    assert inversion.iterations == [STEPS * INNER]

    # The official call pattern, per image: S pivot calls, then per step one conditional call,
    # N unconditional calls with autograd and one batched [uncond; cond] advance.
    per_step = [(1, False)] + [(1, True)] * INNER + [(2, False)]
    assert [(c["batch"], c["grad_enabled"]) for c in calls] == [(1, False)] * STEPS + per_step * STEPS
    # Unfrozen weights and explicit attention throughout; the weight gradients exist during the loop
    # (accumulated by every backward, never zeroed, as in the official code).
    assert all(c["requires_grad"] for c in calls)
    assert all(c["processor"] is AttnProcessor for c in calls)
    grad_calls = [c for c in calls if c["grad_enabled"]]
    assert not grad_calls[0]["weight_grad"] and all(c["weight_grad"] for c in grad_calls[1:])

    # Restored: flags, gradients (dropped: None before), the very same processor objects.
    assert [p.requires_grad for p in params] == before_flags
    assert all(p.grad is None for p in params)
    after = unet.attn_processors
    assert after.keys() == before_processors.keys()
    assert all(after[k] is before_processors[k] for k in after)


def test_reference_is_registered_and_batch_independent(latents):
    diffusion, z0 = latents
    assert METHODS["null_text_reference"] is OfficialNullTextInversion
    method = OfficialNullTextInversion(num_inner_steps=1, early_stop_epsilon=-1.0)
    pair = method.invert(diffusion, z0, PROMPTS, [0, 1])
    single = method.invert(diffusion, z0[1:], PROMPTS[1:], [1])
    # One image at a time: the second image's result does not depend on the first's presence.
    assert torch.equal(pair.uncond[1], single.uncond[0])
    assert torch.equal(pair.z_T[1], single.z_T[0])


@pytest.mark.parametrize("static_batch", [False, True])
def test_fast_engine_call_pattern(latents, static_batch):
    """Per step: one conditional call of batch B, the inner calls with autograd (a stopped image
    leaves the batch, or stays in a static one), one advance of batch B (the conditional
    prediction is reused, not recomputed in a 2B batch); weights frozen, SDPA attention."""
    diffusion, z0 = latents
    calls, handle = unet_call_recorder(diffusion.unet)
    try:
        inversion = NullTextInversion(num_inner_steps=INNER, early_stop_epsilon=1.0, static_batch=static_batch).invert(
            diffusion, z0, PROMPTS, [0, 1]
        )
    finally:
        handle.remove()
    assert len(set(inversion.iterations)) == 2, "the images must stop at different iterations"
    pivot, loop = calls[:STEPS], calls[STEPS:]
    assert [(c["batch"], c["grad_enabled"]) for c in pivot] == [(2, False)] * STEPS
    inner_batches, steps_seen = [], 0
    for c in loop:
        if c["grad_enabled"]:
            inner_batches.append(c["batch"])
        else:
            steps_seen += 1
            assert c["batch"] == 2  # the conditional call, then the advance: B, never 2B
    assert steps_seen == 2 * STEPS
    if static_batch:
        assert set(inner_batches) == {2} and len(inner_batches) == max(inversion.iterations)
    else:
        assert set(inner_batches) == {1, 2} and sum(inner_batches) == sum(inversion.iterations)
    assert not any(c["requires_grad"] or c["weight_grad"] for c in calls)
    assert all(c["processor"] is not AttnProcessor for c in calls)


def test_reduced_precision_options(latents):
    """bf16 autocast changes the inner loop's arithmetic only (not the pivot); tf32 sets the float32
    matmul precision to "high" during the inner calls and restores the caller's setting."""
    diffusion, z0 = latents
    settings = {"num_inner_steps": INNER, "early_stop_epsilon": -1.0}
    exact = NullTextInversion(**settings).invert(diffusion, z0, PROMPTS, [0, 1])
    bf16 = NullTextInversion(**settings, precision="bf16").invert(diffusion, z0, PROMPTS, [0, 1])
    assert torch.equal(bf16.pivot, exact.pivot)
    rel = ((bf16.uncond - exact.uncond).norm() / exact.uncond.norm()).item()
    assert 1e-3 < rel < 0.1  # visibly not float32, still the same optimisation

    seen = []
    handle = diffusion.unet.register_forward_hook(
        lambda *args: seen.append((torch.is_grad_enabled(), torch.get_float32_matmul_precision()))
    )
    try:
        NullTextInversion(**settings, precision="tf32").invert(diffusion, z0, PROMPTS, [0, 1])
    finally:
        handle.remove()
    assert {p for grad, p in seen if grad} == {"high"} and {p for grad, p in seen if not grad} == {"highest"}
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("option", [{"precision": "fp16"}, {"compile": "fast"}])
def test_engine_options_are_checked(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        NullTextInversion(**option)


def test_reference_rejects_fast_engine_options():
    with pytest.raises(ValueError, match="official loop"):
        OfficialNullTextInversion(precision="bf16")


def test_compile_implies_a_static_batch():
    assert NullTextInversion(compile="default").static_batch and not NullTextInversion().static_batch
