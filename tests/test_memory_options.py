"""Memory options of the null-text inner loop, on tiny_xl: gradient checkpointing of the UNet
(``inversion.gradient_checkpointing``) and half-precision UNet weights (``model.dtype``) with float32
embeddings, optimiser and latents."""

import numpy as np
import pytest
import torch
from helpers import assert_reconstruct_reproduces, composed

from nulltext.api import load_pipeline
from nulltext.cli import run_inversion
from nulltext.diffusion import Diffusion
from nulltext.methods import DDIMInversion, NullTextInversion
from nulltext.reconstruction import latent_errors, reconstruct
from nulltext.validation import SettingError

STEPS = 3
PROMPTS = ["a photo of a cat"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def z0(sample_images):
    return Diffusion(load_pipeline("tiny_xl"), STEPS).encode_images(sample_images[:1])


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_gives_the_same_null_embeddings(z0):
    pipe = load_pipeline("tiny_xl")
    diffusion = Diffusion(pipe, STEPS)
    block = pipe.unet.down_blocks[1].resnets[0].norm1  # the first layer of a checkpointed block
    calls = count_forwards(block)
    results = {}
    for checkpointing in (False, True):
        calls[0] = 0
        method = NullTextInversion(num_inner_steps=3, early_stop_epsilon=-1.0, gradient_checkpointing=checkpointing)
        results[checkpointing] = (method.invert(diffusion, z0, PROMPTS, [0]), calls[0])
    (plain, plain_calls), (checkpointed, checkpointed_calls) = results[False], results[True]
    # Checkpointing recomputes the block's forward in each of the 3 x 3 backward passes; nothing else changes.
    assert checkpointed_calls == plain_calls + STEPS * 3
    assert not pipe.unet.down_blocks[1].gradient_checkpointing  # off again after the inversion
    assert (plain.uncond - plain.uncond[:, :1]).abs().max() > 1e-3  # the embeddings moved
    torch.testing.assert_close(checkpointed.uncond, plain.uncond, atol=1e-6, rtol=1e-5)  # float noise
    torch.testing.assert_close(checkpointed.z_T, plain.z_T, atol=0, rtol=0)  # the pivot has no gradient


def test_bf16_weights_keep_the_embeddings_and_the_optimiser_float32(z0, monkeypatch):
    pipe = load_pipeline("tiny_xl", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == pipe.vae.dtype == torch.float32
    seen = []  # the parameters the real Adam step updates
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (seen.extend(p for g in self.param_groups for p in g["params"]), step(self, *a, **k))[1])
    errors = {dtype: per_step_errors(load_pipeline("tiny_xl", dtype=dtype), z0) for dtype in ("float32", "bf16")}
    monkeypatch.undo()
    assert seen and {p.dtype for p in seen} == {torch.float32}
    # The bf16 run closes the guided sampling's gap to the pivot as the float32 one does (measured:
    # 0.80 / 1.78 / 1.78 both, DDIM inversion 0.98 / 2.23 / 2.24).
    assert (errors["bf16"]["null_text"][1:] < 0.9 * errors["bf16"]["ddim"][1:]).all()
    torch.testing.assert_close(errors["bf16"]["null_text"], errors["float32"]["null_text"], atol=0, rtol=0.05)
    with pytest.raises(SettingError, match="model.dtype='float8'"):
        load_pipeline("tiny_xl", dtype="float8")


def per_step_errors(pipe, z0) -> dict:
    """The reconstruction's latent error against the pivot at every step, after DDIM and null-text inversion."""
    diffusion, errors = Diffusion(pipe, STEPS), {}
    for name, method in (("ddim", DDIMInversion()), ("null_text", NullTextInversion(num_inner_steps=5, early_stop_epsilon=-1.0))):
        inversion = method.invert(diffusion, z0, PROMPTS, [0])
        if name == "null_text":
            assert inversion.uncond.dtype == inversion.z_T.dtype == torch.float32 and inversion.uncond.shape == (1, STEPS, 78, 80)
        errors[name] = latent_errors(reconstruct(diffusion, inversion).trajectory, inversion.pivot)[0]
    return errors


def test_the_memory_options_from_the_command_line(tmp_path):
    overrides = ["model=tiny_xl", "model.dtype=bf16", "inversion=null_text", "inversion.gradient_checkpointing=true",
                 "inversion.num_inner_steps=2", f"diffusion.num_inference_steps={STEPS}", "data.limit=1", "logger=csv"]
    with composed("config", overrides, tmp_path / "run") as cfg:
        metrics = run_inversion(cfg)
    assert metrics["num_failed"] == 0 and np.isfinite(metrics["psnr_mean"])
    assert metrics["images"][0]["iterations"] == STEPS * 2
    # The artifact records model.dtype: `nulltext reconstruct` rebuilds the bf16 UNet and reproduces the run.
    assert_reconstruct_reproduces(tmp_path / "run", metrics["images"][0]["id"], tmp_path / "rec")
