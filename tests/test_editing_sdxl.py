"""Prompt-to-Prompt and SDEdit on SDXL (the tiny_xl random model, 4 DDIM steps).

As tests/test_editing.py does on SD: exact properties, since the tiny model draws noise. The SDXL
specifics: every transformer layer of every block is controlled, the cross-attention's keys are the
77 token positions shared by both text encoders, and each row of the edit batch carries its own
prompt's pooled embedding (and the unconditional rows the inversion's pooled nulls).
"""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from helpers import composed
from PIL import Image

from nulltext import api
from nulltext.cli import run_inversion
from nulltext.diffusion import Diffusion
from nulltext.editing import AttentionController, ControllerGroup, EditError, EditSettings, build_controller, edit, sdedit
from nulltext.editing.tokens import replacement_mapper
from nulltext.models import t5_tokenizer
from nulltext.reconstruction import reconstruct

STEPS = 4
SOURCE = "a photo of a cat"
TARGET = "a photo of a dog"
LATENT_ATOL = 2e-3  # rows computed in batches of other sizes, explicit attention vs SDPA: float rounding


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return api.load_pipeline("tiny_xl")


@pytest.fixture(scope="module")
def diffusion(pipe):
    return Diffusion(pipe, STEPS)


@pytest.fixture(scope="module")
def inversion(pipe, sample_images):
    """A real SDXL null-text inversion (one inner step per timestep): per-step nulls and pooled nulls."""
    photo = Image.fromarray(sample_images[0].permute(1, 2, 0).numpy())
    return api.invert(pipe, photo, SOURCE, num_inference_steps=STEPS, num_inner_steps=1).inversion


@pytest.fixture(scope="module")
def recon(diffusion, inversion):
    return reconstruct(diffusion, inversion)


@pytest.mark.parametrize("mode", ["replace", "refine"])
def test_an_edit_to_the_source_prompt_reproduces_the_reconstruction(diffusion, inversion, recon, mode):
    out = edit(diffusion, inversion, [SOURCE, SOURCE], {"mode": mode, "cross_replace": 1.0, "self_replace": 1.0})
    assert inversion.uncond.shape == (1, STEPS, 78, 80)  # per-step nulls with their pooled row
    for row in range(3):
        assert torch.allclose(out.latents[row], recon.latents[0], atol=LATENT_ATOL), row
        assert (out.images[row].int() - recon.images[0].int()).abs().max() <= 1, row


class Probe(AttentionController):
    """Records the conditional half's maps as the controllers before it left them."""

    def __init__(self):
        super().__init__()
        self.maps = {True: {}, False: {}}

    def observe(self, attn, is_cross, place):
        self.maps[is_cross].setdefault(self.step, []).append(attn.clone())


def test_a_word_swap_changes_the_attention_maps_only_by_the_replacement_rule(diffusion, inversion):
    probe = Probe()
    main = build_controller(EditSettings(mode="replace", cross_replace=0.5, self_replace=0.5))
    out = edit(diffusion, inversion, [TARGET], ControllerGroup(main, probe))
    mapper = replacement_mapper(diffusion.tokenizer, SOURCE, TARGET)
    assert sorted(probe.maps[True]) == list(range(STEPS))
    for step in range(STEPS):
        cross, self_maps = probe.maps[True][step], probe.maps[False][step]
        # tiny_xl: transformer blocks of 2 layers in the down, mid and up blocks (1 + 1 + 2 blocks): 8 of each.
        assert len(cross) == len(self_maps) == 8
        for attn in cross:
            assert attn.shape[-1] == 77  # both encoders' tokens side by side in the channels: 77 keys
            expected = attn[0] @ mapper  # the official rule: the source's maps carried to the target's tokens
            if step < STEPS // 2:
                assert torch.allclose(attn[1], expected, atol=1e-6), step
            else:
                assert not torch.allclose(attn[1], expected, atol=1e-3), step
        for attn in self_maps:  # 8x8 maps: at most the official 16x16, replaced inside their window
            assert torch.equal(attn[1], attn[0]) == (step < STEPS // 2), step
    assert (out.latents[1] - out.latents[0]).abs().max() > 100 * LATENT_ATOL


def test_each_row_of_the_edit_batch_samples_with_its_own_prompt_and_pooled_embedding(diffusion, inversion):
    """With a controller that edits nothing, row k is the guided sampling of prompt k alone from z_T
    with the inversion's nulls: the batched call hands every row its own pooled embedding and time ids."""
    prompts = [TARGET, "a red car on a street"]
    out = edit(diffusion, inversion, prompts, AttentionController())
    for row, prompt in enumerate(prompts, start=1):
        alone = diffusion.sample(inversion.z_T, inversion.uncond, diffusion.encode_text([prompt]).unsqueeze(1), inversion.guidance_scale)
        assert torch.allclose(out.latents[row], alone[0, -1], atol=LATENT_ATOL), row
    assert (out.latents[1] - out.latents[2]).abs().max() > 100 * LATENT_ATOL


def test_the_self_window_warns_when_no_self_attention_map_is_small_enough(diffusion, inversion, caplog):
    """SDXL at 1024 px has no map as small as the official 16x16: a warning line, not a silent no-op."""
    with caplog.at_level(logging.WARNING, logger="nulltext.editing.attention"):
        edit(diffusion, inversion, [TARGET], {"mode": "replace", "self_replace_max_tokens": 16})
    assert "the smallest has 8x8 = 64 queries, more than self_replace_max_tokens=16; set self_replace_max_tokens=64" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nulltext.editing.attention"):
        edit(diffusion, inversion, [TARGET], {"mode": "replace"})
    assert "self_replace" not in caplog.text


def test_tokenizers_that_split_prompts_differently_are_refused(pipe, inversion):
    """Word positions index both encoders' halves of the context: a second tokenizer that splits prompts
    otherwise (here a character one) stops the edit in one line."""
    other = StableDiffusionXLPipeline(**{**pipe.components, "tokenizer_2": t5_tokenizer(77)})
    with pytest.raises(EditError, match="the two text encoders' tokenizers split 'a photo of a cat' differently"):
        edit(Diffusion(other, STEPS), inversion, [TARGET], {"mode": "replace"})


def test_sdedit_endpoints(diffusion, inversion, recon):
    """As on SD: strength 0 re-samples nothing; strength 1 with the source prompt is the reconstruction again."""
    zero = sdedit(diffusion, inversion, [TARGET], strength=0.0)
    assert torch.equal(zero.images[1], recon.images[0])
    full = sdedit(diffusion, inversion, [SOURCE, TARGET], strength=1.0)
    assert torch.allclose(full.latents[1], recon.latents[0], atol=LATENT_ATOL)
    assert (full.latents[2] - recon.latents[0]).abs().max() > 100 * LATENT_ATOL
    assert torch.equal(full.images[0], recon.images[0])
    half = sdedit(diffusion, inversion, [TARGET], strength=0.5)
    # From step 2 of 4 the target prompt moves the latents, less than from z_T.
    moved = [(out.latents[-1] - recon.latents[0]).abs().max() for out in (half, full)]
    assert half.settings["start_step"] == 2 and 10 * LATENT_ATOL < moved[0] < moved[1]


def test_cli_edit_sdedit_and_attention_on_a_tiny_xl_null_text_artifact(tmp_path):
    from nulltext.editing.cli import run_attention, run_edit

    run_dir = tmp_path / "run"
    overrides = ["model=tiny_xl", "inversion=null_text", "inversion.num_inner_steps=1", f"diffusion.num_inference_steps={STEPS}", "data.limit=1", "logger=csv"]
    with composed("config", overrides, run_dir) as cfg:
        image_id = run_inversion(cfg)["images"][0]["id"]
    artifact = f"artifact={run_dir / 'inversions' / (image_id + '.safetensors')}"
    in_run = np.asarray(Image.open(run_dir / "images" / f"{image_id}.png")).astype(int)
    run_recon = in_run[:, 2 * in_run.shape[1] // 3 :]  # the run's panels: input | VAE | reconstruction

    # The sample photo's caption: "a smiling woman astronaut in an orange spacesuit next to an american flag and a space shuttle model".
    target = "a smiling man astronaut in an orange spacesuit next to an american flag and a space shuttle model"
    with composed("edit", [artifact, f"prompts={json.dumps([target])}", "blend_words=[woman,man]"], tmp_path / "edit") as cfg:
        metrics = run_edit(cfg)
    out = tmp_path / "edit"
    (edited,) = (out / "edits").glob("*.png")
    assert edited.name.startswith("01_a_smiling_man") and Image.open(edited).size == (64, 64) and (out / "masks" / edited.name).exists()
    recon = np.asarray(Image.open(out / "reconstruction.png")).astype(int)
    assert np.abs(recon - run_recon).max() <= 1  # row 0 is the run's reconstruction (explicit attention: rounding)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["mode"] == "replace" and saved["method"] == "null_text" and saved["edits"][0]["prompt"] == target
    assert metrics["mask"] == "local_blend" and 0 <= saved["edits"][0]["footprint"] <= 1

    with composed("edit", [artifact, 'prompts=["a photo of a dog"]', "mode=sdedit", "strength=0.5"], tmp_path / "sdedit") as cfg:
        run_edit(cfg)
    settings = json.loads((tmp_path / "sdedit" / "settings.json").read_text())
    assert settings["edit"]["mode"] == "sdedit" and settings["edit"]["start_step"] == 2
    assert len(list((tmp_path / "sdedit" / "edits").glob("01_*.png"))) == 1

    with composed("attention", [artifact, "tile_size=64"], tmp_path / "attention") as cfg:
        run_attention(cfg)
    info = json.loads((tmp_path / "attention" / "attention.json").read_text())
    assert info["tokens"][:4] == ["<|startoftext|>", "a", "smiling", "woman"] and info["tokens"][-1] == "<|endoftext|>"
    assert info["map_size"] == [8, 8]
