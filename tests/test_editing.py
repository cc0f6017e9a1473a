"""Prompt-to-Prompt / SDEdit on saved inversions (tiny random model, 10 DDIM steps).

The tiny model's pictures are noise, so nothing here checks that an edit looks right (a colour
swap on a trained model comes later); every test checks an exact property instead: identities
that must hold (same prompt -> reconstruction, factor 1 -> no-op), the source row untouched,
attention maps that are distributions, latents outside the local-blend mask equal to the
source's, processors equivalent to diffusers' and restored, and the CLI outputs.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import composed
from omegaconf import OmegaConf
from PIL import Image

from nulltext import api
from nulltext.artifacts import save_artifact
from nulltext.diffusion import Diffusion
from nulltext.editing import (
    AttentionController,
    AttentionStore,
    ControlledAttnProcessor,
    ControllerGroup,
    EditError,
    EditSettings,
    LocalBlend,
    attention_control,
    build_controller,
    edit,
    edit_metrics,
    sdedit,
)
from nulltext.editing.tokens import align_tokens, prompt_token_ids, refinement_mapper, replacement_mapper, word_positions
from nulltext.reconstruction import reconstruct

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
SOURCE = "a photo of a cat"
DIFFUSION_CONFIG = {"_target_": "nulltext.diffusion.Diffusion", "num_inference_steps": STEPS, "guidance_scale": 7.5}
# Latents of rows computed in batches of different sizes (and SDPA vs explicit attention) agree to
# float rounding only; a real edit moves latents by O(0.1-1).
LATENT_ATOL = 2e-3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's ops are too small to gain from threads, and on shared cores OpenMP's waiting
    threads slow them down several times (measured: 10 s with one thread, 70 s with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def diffusion(tiny_pipe):
    return Diffusion(tiny_pipe, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def artifact(tiny_pipe, sample_images, tmp_path_factory):
    """A real null-text inversion (1 inner step per timestep, to stay fast) saved as the runner does."""
    image = Image.fromarray(sample_images[0].permute(1, 2, 0).numpy())
    result = api.invert(tiny_pipe, image, SOURCE, num_inference_steps=STEPS, num_inner_steps=1)
    metadata = {
        "id": "cat",
        "method": {"name": "null_text", "num_inner_steps": 1},
        "model_config": OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")),
        "diffusion_config": DIFFUSION_CONFIG,
    }
    stem = tmp_path_factory.mktemp("run") / "inversions" / "cat"
    save_artifact(stem, result.inversion, metadata)
    return stem.with_suffix(".safetensors"), result.inversion


@pytest.fixture(scope="module")
def inversion(artifact):
    return artifact[1]


@pytest.fixture(scope="module")
def recon(diffusion, inversion):
    return reconstruct(diffusion, inversion)


BLEND = {"mode": "replace", "blend_words": ["cat", "dog"], "blend_threshold": 0.9}
EDITS = {
    # name: (target prompts, settings or a controller factory)
    "noop": (["a photo of a dog"], AttentionController),
    "reweight_1": (["a photo of a dog"], {"mode": "reweight", "reweight": {"dog": 1.0}, "cross_replace": 1.0, "self_replace": 0.0}),
    "reweight_3": (["a photo of a dog"], {"mode": "reweight", "reweight": {"dog": 3.0}, "cross_replace": 1.0, "self_replace": 0.0}),
    "identity_replace": ([SOURCE, SOURCE], {"mode": "replace", "cross_replace": 1.0, "self_replace": 1.0}),
    "identity_refine": ([SOURCE], {"mode": "refine", "cross_replace": 1.0, "self_replace": 1.0}),
    "refine": (["a photo of a fluffy cat"], {"mode": "refine"}),
    "blend": (["a photo of a dog"], None),  # replace + local blend, with an AttentionStore in front
}


@pytest.fixture(scope="module")
def edits(diffusion, inversion):
    """Each edit of EDITS computed once, on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            prompts, settings = EDITS[name]
            if name == "blend":
                store = AttentionStore(store_self=True)
                out = edit(diffusion, inversion, prompts, ControllerGroup(store, build_controller(EditSettings(**BLEND))))
                cache[name] = (out, store)
            else:
                cache[name] = edit(diffusion, inversion, prompts, settings() if isinstance(settings, type) else settings)
        return cache[name]

    return get


# ---------------------------------------------------------------------------------- tokens
def test_word_positions_follow_the_clip_tokenizer(tiny_pipe):
    tok = tiny_pipe.tokenizer
    prompt = "A red-haired astronaut's Helmet."
    ids = prompt_token_ids(tok, prompt)
    pieces = lambda positions: "".join(tok.decode([ids[p]]) for p in positions)  # noqa: E731
    assert word_positions(tok, prompt, "red-haired") == [2, 3, 4] and pieces([2, 3, 4]) == "red-haired"
    assert word_positions(tok, prompt, "astronaut's") == [5, 6] and pieces([5, 6]) == "astronaut's"
    assert word_positions(tok, prompt, "helmet") == [7, 8]  # case and edge punctuation ignored; "." is token 8
    assert word_positions(tok, prompt, "red-haired astronaut's") == [2, 3, 4, 5, 6]
    assert word_positions(tok, prompt, 0) == [1]
    assert word_positions(tok, prompt, "dog") == []
    assert word_positions(tok, "a cat and a dog", "a") == [1, 4]


def test_token_mappers(tiny_pipe):
    tok = tiny_pipe.tokenizer
    # refinement: "fluffy" (target position 5) has no source token; "cat" and the end token shift by one
    assert align_tokens([0, 1, 2, 3], [0, 1, 9, 2, 3]) == [0, 1, None, 2, 3]
    mapper, aligned = refinement_mapper(tok, SOURCE, "a photo of a fluffy cat")
    assert mapper[:8].tolist() == [0, 1, 2, 3, 4, 0, 5, 6] and aligned[:8].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]
    assert mapper[8:12].tolist() == [7, 8, 9, 10] and bool(aligned[8:].all())  # padding follows padding
    # replacement: cat (1 token) -> astronaut's (2 tokens) shares the source word's attention; "on" follows
    m = replacement_mapper(tok, "a cat on the mat", "a astronaut's on the mat")
    assert m[2, 2] == m[2, 3] == 0.5
    assert m[3, 4] == 1 and m[4, 5] == 1 and m[5, 6] == 1 and m[6, 7] == 1  # on, the, mat, end token
    assert torch.equal(m.sum(1)[:70], torch.ones(70))  # every source position passes its attention on
    with pytest.raises(EditError):
        replacement_mapper(tok, SOURCE, "a photo of a fluffy cat")


def test_cross_attention_windows_per_word(tiny_pipe):
    from nulltext.editing.attention import cross_replace_alphas

    alphas = cross_replace_alphas(tiny_pipe.tokenizer, [SOURCE, "a photo of a dog"], STEPS, {"dog": 0.3, "default_": 0.8})
    assert alphas.shape == (STEPS, 1, 77)
    assert alphas[:, 0, 5].tolist() == [1] * 3 + [0] * 7  # "dog" (position 5): 30 % of the steps
    assert alphas[:, 0, 2].tolist() == [1] * 8 + [0] * 2  # every other token: the default 80 %
    assert cross_replace_alphas(tiny_pipe.tokenizer, [SOURCE, SOURCE], STEPS, (0.2, 0.5))[:, 0, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(EditError):
        cross_replace_alphas(tiny_pipe.tokenizer, [SOURCE, "a photo of a dog"], STEPS, {"zebra": 0.3})


# ---------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("name", ["identity_replace", "identity_refine"])
def test_replacing_a_prompt_by_itself_reproduces_the_reconstruction(edits, recon, name):
    out = edits(name)
    assert out.images.shape[0] == len(EDITS[name][0]) + 1
    for row in range(out.images.shape[0]):
        assert torch.allclose(out.latents[row], recon.latents[0], atol=LATENT_ATOL), row
        assert (out.images[row].int() - recon.images[0].int()).abs().max() <= 1, row


class Probe(AttentionController):
    """Records the conditional half's cross-attention as the controllers before it left it."""

    def __init__(self):
        super().__init__()
        self.maps = {}

    def observe(self, attn, is_cross, place):
        if is_cross:
            self.maps.setdefault(self.step, []).append(attn.clone())


@pytest.mark.parametrize("mode,target", [("replace", "a photo of a dog"), ("refine", "a photo of a fluffy cat")])
def test_cross_attention_is_injected_inside_its_window(diffusion, inversion, mode, target):
    probe = Probe()
    main = build_controller(EditSettings(mode=mode, cross_replace=0.5, self_replace=0.0))
    edit(diffusion, inversion, [target], ControllerGroup(main, probe))
    tok = diffusion.tokenizer
    if mode == "replace":
        inject = lambda source: source @ replacement_mapper(tok, SOURCE, target)  # noqa: E731
        columns = torch.ones(77, dtype=torch.bool)
    else:
        mapper, aligned = refinement_mapper(tok, SOURCE, target)
        inject = lambda source: source[..., mapper]  # noqa: E731
        columns = aligned.bool()  # unaligned ("fluffy") keeps the target's own map
    assert sorted(probe.maps) == list(range(STEPS))
    for step, layers in probe.maps.items():
        for attn in layers:
            expected, got = inject(attn[0])[..., columns], attn[1][..., columns]
            if step < STEPS // 2:
                assert torch.allclose(got, expected, atol=1e-6), step
            else:
                assert not torch.equal(got, expected), step


def test_reweight_of_one_is_a_noop(edits):
    noop, same, scaled = edits("noop"), edits("reweight_1"), edits("reweight_3")
    assert torch.equal(same.latents, noop.latents) and torch.equal(same.images, noop.images)
    # ... and the reweighting really acts on the word: a factor 3 moves the edited row only
    assert (scaled.latents[1] - noop.latents[1]).abs().max() > 100 * LATENT_ATOL
    assert torch.equal(scaled.latents[0], noop.latents[0])


def test_no_controller_edit_matches_noop_controller(diffusion, inversion, edits):
    plain = edit(diffusion, inversion, ["a photo of a dog"], None)  # default (SDPA) processors
    assert torch.allclose(plain.latents, edits("noop").latents, atol=LATENT_ATOL)


def test_target_uncond_empty_samples_the_edited_rows_from_the_plain_null_text(diffusion, inversion):
    """target_uncond=empty: with Prompt-to-Prompt the source row is the default edit's, bit for bit,
    and the edited row moves; without attention control the edited row is what the default gives for
    the same inversion with psi("") as its unconditional embedding at every step (an independent
    way to the same sampling). Bad values and modes without Prompt-to-Prompt sampling: one line each."""
    import dataclasses

    from nulltext.editing.errors import EditError
    from nulltext.validation import SettingError

    target = ["a photo of a dog"]
    default = edit(diffusion, inversion, target, {"mode": "replace"})
    empty = edit(diffusion, inversion, target, {"mode": "replace", "target_uncond": "empty"})
    assert torch.equal(empty.latents[0], default.latents[0]) and empty.settings["target_uncond"] == "empty"
    assert (empty.latents[1] - default.latents[1]).abs().max() > 100 * LATENT_ATOL

    plain_null = dataclasses.replace(inversion, uncond=diffusion.null_text()[:, None].expand_as(inversion.uncond).clone())
    unguided_rows = edit(diffusion, inversion, target, {"mode": "none", "target_uncond": "empty"})
    reference = edit(diffusion, plain_null, target, {"mode": "none"})
    assert torch.allclose(unguided_rows.latents[1], reference.latents[1], atol=LATENT_ATOL)

    with pytest.raises(SettingError, match="^target_uncond='zero' is not allowed"):
        EditSettings(target_uncond="zero").validate()
    with pytest.raises(EditError, match="target_uncond=empty applies to Prompt-to-Prompt sampling, not mode=sdedit"):
        EditSettings(mode="sdedit", target_uncond="empty").validate()


@pytest.mark.parametrize("name", list(EDITS))
def test_source_row_is_the_reconstruction(edits, recon, name):
    out = edits(name)
    out = out[0] if isinstance(out, tuple) else out
    assert out.prompts[0] == SOURCE
    assert torch.allclose(out.latents[0], recon.latents[0], atol=LATENT_ATOL)
    assert (out.images[0].int() - recon.images[0].int()).abs().max() <= 1


# ---------------------------------------------------------------------------------- attention maps
def test_stored_attention_maps_are_distributions(edits):
    out, store = edits("blend")
    assert store.num_stored_steps == STEPS
    average = store.average()
    assert {"down_cross", "up_cross", "mid_cross", "down_self", "up_self", "mid_self"} <= set(average)
    for key, maps in average.items():
        for m in maps:
            assert m.shape[0] == 2  # conditional half only: one map per prompt
            assert m.shape[-1] == (77 if key.endswith("cross") else m.shape[1])
            assert m.min() >= 0
            assert torch.allclose(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5), key
    agg = store.aggregate()
    assert agg.shape == (2, 8, 8, 77) and torch.allclose(agg.sum(-1), torch.ones(2, 8, 8), atol=1e-5)


def test_local_blend_keeps_the_source_outside_the_mask(edits, recon):
    out, _ = edits("blend")
    latent_mask = out.latent_masks[0, 0].bool()
    assert 0 < latent_mask.float().mean() < 1  # a real partial mask, else the test proves nothing
    outside = ~latent_mask
    # latents outside the mask are the source row's, exactly (blended at the last step)
    assert torch.equal(out.latents[1][:, outside], out.latents[0][:, outside])
    assert torch.allclose(out.latents[1][:, outside], recon.latents[0][:, outside], atol=LATENT_ATOL)
    assert (out.latents[1][:, latent_mask] - out.latents[0][:, latent_mask]).abs().max() > 0.1
    # pixels: the VAE decoder mixes neighbouring latents, so only "much closer outside than inside"
    pixel_mask = out.masks[0, 0].bool()
    diff = (out.images[1].float() - recon.images[0].float()).abs().amax(0)
    assert diff[~pixel_mask].mean() < 0.5 * diff[pixel_mask].mean()


def test_local_blend_mask_rule():
    """Synthetic maps: mask = union of source and target word regions above threshold * max."""
    blend = LocalBlend(["cat", "dog"], threshold=0.5, start=0.0, queries=16)


    blend.prompts, blend.latent_shape, blend.start_step, blend.step = ["s", "t"], (4, 4), 0, 0
    blend.word_weights = torch.tensor([[0, 0, 1.0, 0], [0, 0, 1.0, 0]])
    maps = torch.zeros(2, 16, 4)
    maps[:, :, 0] = 1
    maps[0, 0, 2], maps[1, 15, 2] = 1.0, 1.0  # source word at the top-left, target word at the bottom-right
    blend.sums = {16: maps}
    mask = blend.compute_mask()[1, 0]
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 1  # 3x3 max-pool around each peak
    expected[2:, 2:] = 1
    assert torch.equal(mask, expected)
    latents = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    blend.current = {}
    out = blend.step_callback(latents)
    assert torch.equal(out[1, 0], expected) and torch.equal(out[0], latents[0])


def test_blend_resolution_picks_the_maps_of_that_side():
    """8x8 latents: the official rule takes the 2x2 maps (a quarter of the side), whose mask covers
    everything; blend_resolution=4 takes the 4x4 maps and a local mask; a side without maps is an error."""

    def blend_for(side):
        settings = EditSettings.from_dict({"mode": "replace", "blend_words": ["cat", "dog"], "blend_resolution": side})
        blend = build_controller(settings).find(LocalBlend)
        blend.prompts, blend.latent_shape = ["s", "t"], (8, 8)
        blend.word_weights = torch.tensor([[0, 1.0], [0, 1.0]])
        fine = torch.zeros(2, 16, 2)
        fine[:, :, 0], fine[:, 0, 1] = 1.0, 1.0  # the word attends to the top-left cell only
        blend.sums = {16: fine, 4: torch.full((2, 4, 2), 0.5)}
        return blend

    assert blend_for(None).compute_mask().mean() == 1.0
    mask = blend_for(4).compute_mask()[1, 0]
    expected = torch.zeros(8, 8)
    expected[:4, :4] = 1  # the 3x3 max-pool of the top-left cell of a 4x4 map, at 8x8
    assert torch.equal(mask, expected)
    with pytest.raises(EditError, match=r"blend_resolution 8: no cross-attention maps of that side; this model has \[2, 4\]"):
        blend_for(8).compute_mask()


# ---------------------------------------------------------------------------------- processors
def test_processor_without_controller_matches_diffusers_default(diffusion):
    unet = diffusion.unet
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = diffusion.encode_text(["", SOURCE])
    with torch.no_grad():
        reference = unet(z, 981, encoder_hidden_states=context).sample
        with attention_control(unet, None):
            plain = unet(z, 981, encoder_hidden_states=context).sample
        controller = AttentionController()
        controller.prepare([SOURCE], diffusion.tokenizer, STEPS, (16, 16))
        with attention_control(unet, controller):
            routed = unet(z, 981, encoder_hidden_states=context).sample
    assert (plain - reference).abs().max() < 1e-5
    assert torch.equal(routed, plain)


def test_processors_are_restored(diffusion, inversion):
    unet = diffusion.unet
    before = unet.attn_processors
    with attention_control(unet, AttentionController()):
        inside = unet.attn_processors
        assert all(isinstance(p, ControlledAttnProcessor) for p in inside.values())
        assert {p.place for p in inside.values()} == {"down", "mid", "up"}
    assert all(unet.attn_processors[k] is p for k, p in before.items())
    with pytest.raises(EditError):  # an edit failing half way (unknown word) restores them too
        edit(diffusion, inversion, ["a photo of a dog"], {"mode": "reweight", "reweight": {"zebra": 2.0}})
    with pytest.raises(RuntimeError), attention_control(unet, AttentionController()):
        raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is p for k, p in before.items())


# ---------------------------------------------------------------------------------- SDEdit
def test_sdedit_endpoints(diffusion, inversion, recon):
    # strength 0: nothing re-sampled; strength 1 with the source prompt: the reconstruction again
    zero = sdedit(diffusion, inversion, ["a photo of a dog"], strength=0.0)
    assert torch.equal(zero.images[1], recon.images[0])
    full = sdedit(diffusion, inversion, [SOURCE, "a photo of a dog"], strength=1.0)
    assert torch.allclose(full.latents[1], recon.latents[0], atol=LATENT_ATOL)
    assert (full.latents[2] - recon.latents[0]).abs().max() > 100 * LATENT_ATOL
    assert torch.equal(full.images[0], recon.images[0])


# ---------------------------------------------------------------------------------- metrics
def test_edit_metrics_measure_only_the_background():
    torch.manual_seed(0)
    recon = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    edited = recon.clone()
    edited[:, :, :16] = 255 - edited[:, :, :16]  # change the top half only
    region = torch.zeros(1, 1, 32, 32)
    region[..., :16, :] = 1
    m = edit_metrics(torch.cat([recon, edited]), [SOURCE, "x"], edited_region=region, mask_source="given")
    e = m["edits"][0]
    assert e["background_vs_reconstruction"]["psnr"] == "inf"
    assert e["background_vs_reconstruction"]["lpips"] == pytest.approx(0, abs=1e-6)
    assert e["background_fraction"] == 0.5
    assert e["footprint"] == pytest.approx((edited.int() - recon.int()).abs().amax(1).gt(25.5).float().mean().item())
    assert e["clip_score"] is None and e["clip_score_reason"] == "unavailable offline"
    whole = edit_metrics(torch.cat([recon, edited]), [SOURCE, "x"])["edits"][0]
    assert whole["background_vs_reconstruction"]["psnr"] < 20 and whole["background_fraction"] == 1.0


# ---------------------------------------------------------------------------------- CLI
def test_cli_edit_and_attention(artifact, tmp_path):
    from nulltext.cli import SUBCOMMANDS
    from nulltext.editing.cli import run_attention, run_edit

    assert {"edit", "attention"} <= set(SUBCOMMANDS)
    path, _ = artifact
    prompts = ["a photo of a dog", "a photo of a tiger"]
    overrides = [f"artifact={path}", f"prompts={json.dumps(prompts)}", "blend_words=[cat,[dog,tiger]]", "blend_threshold=0.9"]
    with composed("edit", overrides, tmp_path / "edit") as cfg:
        metrics = run_edit(cfg)
    out = tmp_path / "edit"
    grid = Image.open(out / "grid.png")
    assert grid.width >= 3 * 256  # reconstruction | 2 edits, enlarged to 256
    edit_files = sorted((out / "edits").glob("*.png"))
    assert [p.name for p in edit_files] == ["01_a_photo_of_a_dog.png", "02_a_photo_of_a_tiger.png"]
    assert Image.open(edit_files[0]).size == (64, 64) and len(list((out / "masks").glob("*.png"))) == 2
    saved = json.loads((out / "metrics.json").read_text())
    saved.pop("sha256")  # the file's checksum of its content
    assert saved == json.loads(json.dumps(metrics)) and saved["mask"] == "local_blend"
    assert [e["prompt"] for e in saved["edits"]] == prompts
    for e in saved["edits"]:
        assert 0 < e["background_fraction"] < 1 and 0 <= e["footprint"] <= 1
        assert e["clip_score"] is None and e["clip_score_reason"] == "unavailable offline"
        assert e["background_vs_reconstruction"]["ssim"] > 0.5
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == prompts and settings["source_prompt"] == SOURCE and settings["edit"]["mode"] == "replace"

    with composed("attention", [f"artifact={path}", "tile_size=64"], tmp_path / "attention") as cfg:
        run_attention(cfg)
    info = json.loads((tmp_path / "attention" / "attention.json").read_text())
    assert info["tokens"] == ["<|startoftext|>", "a", "photo", "of", "a", "cat", "<|endoftext|>"]
    assert Image.open(tmp_path / "attention" / "attention.png").width == 8 * 64 + 7 * 2  # picture + 7 tokens


def test_cli_edit_inverts_an_image_first_and_runs_sdedit(sample_images, tmp_path):
    from nulltext.editing.cli import run_edit

    image = tmp_path / "cat.png"
    Image.fromarray(sample_images[0].permute(1, 2, 0).numpy()).save(image)
    overrides = [
        f"image={image}",
        f"caption={SOURCE!r}",
        "method_options={num_inner_steps: 1}",
        "diffusion.num_inference_steps=4",
        'prompts=["a photo of a dog"]',
        "mode=sdedit",
        "strength=0.5",
    ]
    with composed("edit", overrides, tmp_path / "out") as cfg:
        metrics = run_edit(cfg)
    out = tmp_path / "out"
    assert (out / "inversions" / "cat.safetensors").exists() and (out / "inversions" / "cat.json").exists()
    assert Image.open(out / "grid.png").width == 3 * 256 + 2 * 2  # input | reconstruction | edit
    edit_entry = metrics["edits"][0]
    assert edit_entry["background_vs_input"] is not None and metrics["mask"] == "none"
    assert "psnr" in metrics["reconstruction_vs_input"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["edit"]["mode"] == "sdedit" and settings["edit"]["start_step"] == 2


def test_cli_edit_needs_a_source(tmp_path):
    from nulltext.editing.cli import run_edit

    with composed("edit", ['prompts=["a photo of a dog"]'], tmp_path) as cfg, pytest.raises(EditError, match="artifact="):
        run_edit(cfg)
