"""The pocket model: its training (tiny config, resume-exact), its export, and the shipped model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nulltext.pocket import evaluation
from nulltext.pocket.export import weights_sha256
from nulltext.pocket.recipe import build_models
from nulltext.pocket.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
POCKET = ROOT / "models" / "pocket"
needs_pocket = pytest.mark.skipif(not (POCKET / "model_index.json").exists(), reason="models/pocket is not trained here")


def _tiny_config(tmp_path: Path, name: str, **overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "train_pocket.yaml")
    del cfg["hydra"]  # ${now:} needs Hydra's runtime; the trainer does not use it
    tiny = {
        "profile": "test",
        "device": "cpu",
        "threads": 1,
        "bf16": False,
        "resolution": 16,
        "vae_from": None,
        "output_dir": str(tmp_path / name / "out"),
        "run_dir": str(tmp_path / name / "run"),
        "checkpoint_every": 2,
        "log_every": 1,
        "save_dtype": "float32",
        "model": {
            "vae": {
                "block_out_channels": [8, 16],
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2,
                "layers_per_block": 1,
                "norm_num_groups": 8,
            },
            "unet": {
                "block_out_channels": [16, 32],
                "layers_per_block": 1,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 16,
                "attention_head_dim": 8,
                "norm_num_groups": 8,
            },
            "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        },
        "vae_train": {"steps": 3, "batch_size": 4, "warmup": 1, "photo_fraction": 0.25, "photo_source_resolution": 32, "decoder_steps": 2},
        "unet_train": {"steps": 4, "batch_size": 4, "warmup": 1, "scale_batches": 1},
        "grounding": {"weight": 0.0},  # on in the GPU recipe, as the padding attention loss:
        "padding": {"attention_weight": 0.0},  # the tests that need them switch them on
    }
    return OmegaConf.merge(cfg, tiny, overrides)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted tiny run, and the same run cut twice (mid-VAE, mid-UNet) and resumed."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pocket-train")
    whole = train(_tiny_config(tmp, "whole"))
    assert train(_tiny_config(tmp, "split", stop_at="vae:1")) is None
    assert train(_tiny_config(tmp, "split", stop_at="unet:2", resume=True)) is None
    ckpt = torch.load(tmp / "split" / "run" / "checkpoint.pt", weights_only=False)
    assert (ckpt["phase"], ckpt["step"]) == ("unet", 2)
    split = train(_tiny_config(tmp, "split", resume=True))
    return whole, split, tmp


def test_training_resumes_to_the_same_weights(trained):
    """Cut in the VAE phase and in the UNet phase, resumed: bit for bit the uninterrupted run's weights."""
    import json

    whole, split, tmp = trained
    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys() and len(a) > 0
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    sessions = json.loads((split / "training.json").read_text())["sessions"]
    assert [(s["from"], s["to"]) for s in sessions] == [("vae:0", "vae:1"), ("vae:1", "unet:2"), ("unet:2", "unet:4")]
    phases = json.loads((whole / "training.json").read_text())["phases"]
    assert {k: (p["steps"], p["samples"]) for k, p in phases.items()} == {"vae": (3, 12), "decoder": (2, 8), "unet": (4, 16)}
    curves = (tmp / "whole" / "run" / "curves.csv").read_text().splitlines()
    assert curves[0].split(",") == ["phase", "step", "loss", "lr", "samples_per_s", "elapsed_min", "token_loss",
                                    "padding_attention_loss", "padding_match_loss", "empty_start_loss"]
    assert len(curves) == 1 + 3 + 2 + 4


def test_a_grounded_run_resumes_from_the_cache_in_another_clone(trained, tmp_path, monkeypatch):
    """The run's checkpoint lives in nulltext's cache (NULLTEXT_CACHE here), not the work tree: a
    grounded run stopped at UNet step 2 and continued by the same command from another working
    directory (a fresh clone) ends bit for bit where the uninterrupted run does; training.json adds
    up the minutes and samples of both sessions; export_only probes the checkpoint without touching it;
    a changed recipe is refused (one line naming the setting), a changed step count is not."""
    import json

    from nulltext.models import cache_folder
    from nulltext.validation import SettingError

    whole, _, _ = trained

    def config(name, **more):
        base = _tiny_config(tmp_path, name, vae_from=str(whole), grounding={"weight": 0.5}, unet_train={"steps": 5, "warmup": 1})
        cfg = OmegaConf.merge(base, more)
        cfg.run_dir, cfg.run_name = None, name
        return cfg

    reference = train(config("once"))
    monkeypatch.chdir(tmp_path)
    assert train(config("cut", stop_at="unet:2")) is None
    checkpoint = cache_folder() / "pocket" / "cut" / "checkpoint.pt"
    assert checkpoint.exists() and not (tmp_path / "cut" / "run").exists()
    before = checkpoint.read_bytes()
    probe = train(config("cut", export_only=True, output_dir=str(tmp_path / "probe")))
    assert checkpoint.read_bytes() == before and json.loads((probe / "training.json").read_text())["unet_steps_done"] == 2
    with pytest.raises(SettingError, match=r"another recipe \(grounding.weight: 0.5 -> 1.0\)"):
        train(config("cut", grounding={"weight": 1.0}))

    clone = tmp_path / "clone"
    clone.mkdir()
    monkeypatch.chdir(clone)
    resumed = train(config("cut"))
    a, b = _weights(reference), _weights(resumed)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    info = json.loads((resumed / "training.json").read_text())
    assert [(s["from"], s["to"], s["samples"]) for s in info["sessions"]] == [("unet:0", "unet:2", 8), ("unet:2", "unet:5", 12)]
    assert info["phases"]["unet"]["samples"] == info["samples_seen"] == 20
    assert info["phases"]["unet"]["minutes"] == pytest.approx(sum(s["minutes"] for s in info["sessions"]), abs=2e-3)
    assert all(s["minutes"] > 0 and s["cpu_minutes"] > 0 and s["threads"] == 1 for s in info["sessions"])
    curves = (cache_folder() / "pocket" / "cut" / "curves.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in curves] == ["1", "2", "3", "4", "5"] and all(row.split(",")[6] for row in curves)  # token_loss
    longer = train(config("cut", unet_train={"steps": 6}))  # more steps: the same run goes on
    assert json.loads((longer / "training.json").read_text())["unet_steps_done"] == 6


def test_saved_folder_loads_with_load_pipeline(trained):
    from nulltext.models import load_pipeline

    whole, _, _ = trained
    assert not (whole / "tokenizer" / "tokenizer.json").exists()  # the compact vocab.json + merges.txt instead
    pipe = load_pipeline(str(whole))
    assert pipe.vae.config.scaling_factor > 0 and pipe.unet.dtype == torch.float32
    assert pipe.tokenizer("a large red circle").input_ids == [49406, 320, 3638, 736, 7117, 49407]
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 16


def test_continued_training_starts_from_the_saved_model(trained, tmp_path):
    """init_from: the UNet phase starts from a saved folder's weights (exactly: at lr 0 nothing moves),
    keeps its VAE and scaling factor, and training.json adds up both stages."""
    import json

    whole, _, _ = trained
    first = json.loads((whole / "training.json").read_text())
    frozen = train(_tiny_config(tmp_path, "lr0", init_from=str(whole), seed=1, unet_train={"lr": 0.0, "steps": 2}))
    a, b = _weights(whole), _weights(frozen)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)

    moved = train(_tiny_config(tmp_path, "more", init_from=str(whole), seed=1, unet_train={"steps": 3}))
    c = _weights(moved)
    assert all(torch.equal(c[k], a[k]) for k in a if k.startswith("vae/"))
    assert any(not torch.equal(c[k], a[k]) for k in a if k.startswith("unet/"))
    info = json.loads((moved / "training.json").read_text())
    assert info["scaling_factor"] == first["scaling_factor"]
    assert info["samples_seen"] == 3 * 4  # the UNet phase only: no VAE steps in the second stage
    assert info["init_from"]["samples_seen"] == first["samples_seen"]
    assert info["total_samples_seen"] == first["samples_seen"] + 12
    assert info["total_training_minutes"] == pytest.approx(first["training_minutes"] + info["training_minutes"], abs=0.02)
    curves = (tmp_path / "more" / "run" / "curves.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:2] for row in curves] == [["unet", "1"], ["unet", "2"], ["unet", "3"]]

    with pytest.raises(FileNotFoundError, match="no saved pipeline there"):
        train(_tiny_config(tmp_path, "bad", init_from=str(tmp_path / "nowhere")))


def test_fresh_unet_on_a_saved_autoencoder_keeps_it_byte_for_byte(trained, tmp_path):
    """vae_from: the VAE phases are skipped, the UNet and text encoder start fresh, and the exported
    autoencoder's files are the input's, byte for byte (weights and scaling_factor)."""
    import json

    whole, _, _ = trained
    out = train(_tiny_config(tmp_path, "fresh", vae_from=str(whole), seed=3, unet_train={"steps": 2}))
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (out / "vae" / name).read_bytes() == (whole / "vae" / name).read_bytes(), name
    info = json.loads((out / "training.json").read_text())
    first = json.loads((whole / "training.json").read_text())
    assert info["scaling_factor"] == first["scaling_factor"]
    assert info["vae_from"]["sha256"] == weights_sha256(whole / "vae")
    assert info["samples_seen"] == 2 * 4 and info["init_from"] is None
    curves = (tmp_path / "fresh" / "run" / "curves.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in curves] == ["unet", "unet"]
    # fresh, not continued: two UNet steps from another seed cannot land on the trained weights
    a, c = _weights(whole), _weights(out)
    assert all(not torch.equal(c[k], a[k]) for k in a if k.startswith("unet/") and k.endswith("conv_in.weight"))

    wrong = {"model": {"vae": {"block_out_channels": [8, 8]}}}
    with pytest.raises(ValueError, match="architecture differs from model.vae"):
        train(_tiny_config(tmp_path, "wrong", vae_from=str(whole), **wrong))
    with pytest.raises(ValueError, match="init_from or vae_from, not both"):
        train(_tiny_config(tmp_path, "both", vae_from=str(whole), init_from=str(whole)))


def test_gpu_job_packs_a_model_that_reassembles_loads_and_samples(trained, tmp_path):
    """The GPU job (scripts/pocket_gpu_job.py) on the CPU, tiny model, tiny budget: training stops on the budget and
    exports its EMA, the evaluation runs, at most 8 files of at most the part size come back, and the
    parts reassemble into a pipeline that loads and samples, with the autoencoder byte for byte."""
    import io
    import json
    import tarfile

    from nulltext.diffusion import Diffusion
    from nulltext.models import load_pipeline

    from nulltext.pocket.job import run_job

    whole, _, _ = trained
    cfg = _tiny_config(tmp_path, "job", vae_from=str(whole), unet_train={"steps": 100_000, "warmup": 1}, grounding={"weight": 0.5})
    out = tmp_path / "OUT"
    part_mib = 2.0  # the tiny model is ~5 MB (most of it the 49,408-token table in float32)
    eval_args = ["--steps", "2", "--text-images", "2", "--attention-images", "1", "--vae-images", "0", "--inv-images", "0", "--photos"]
    job = run_job(cfg, out, minutes=0.16, reserve=0.1, device="cpu", part_mib=part_mib, eval_args=eval_args)

    files = sorted(out.iterdir())
    assert len(files) <= 8 and {"curves.csv", "pocket_eval.json", "pocket_eval.md", "job.json"} <= {f.name for f in files}
    parts = sorted(out.glob("pocket.tar.part-*"))
    assert len(parts) >= 2 and all(p.stat().st_size <= part_mib * 2**20 for p in parts)
    assert 0 < job["unet_steps_done"] < 100_000  # the budget ran out: the EMA was exported as it stood
    report = json.loads((out / "pocket_eval.json").read_text())
    assert report["device"] == "cpu" and {"text_control", "attention_localisation"} <= report.keys()
    assert "attention ratio >= 3" in report["checks"] and "text control @7.5: colour >= 95%" in report["checks"]

    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(tmp_path / "back", filter="data")
    back = tmp_path / "back" / "pocket"
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (back / "vae" / name).read_bytes() == (whole / "vae" / name).read_bytes()
    pipe = load_pipeline(str(back))
    diffusion = Diffusion(pipe, num_inference_steps=2)
    cond = diffusion.encode_text(["a large red circle in the center on a plain gray background"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = diffusion.decode(diffusion.sample(z, diffusion.encode_text([""])[:, None], cond[:, None])[:, -1])
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def _one_object_targets(side_resolution: int = 16, dropped: bool = False):
    """GroundingTargets of two real scenes (one object; two objects), at 16 px."""
    from nulltext.models import clip_tokenizer
    from nulltext.pocket.grounding import CaptionPositions, GroundingTargets
    from nulltext.scenes import LayoutTokenizer, Scene, SceneObject, layout_from_scenes, object_coverage

    scenes = [Scene((SceneObject("circle", "red", "large", "left"),), "plain", "gray"),
              Scene((SceneObject("square", "blue", "large", "right"), SceneObject("ring", "green", "small", "top")), "checker", "pink")]
    layout = layout_from_scenes(scenes, jitter=False)
    positions = CaptionPositions(LayoutTokenizer(clip_tokenizer()))
    coverage = object_coverage(layout, side_resolution)
    return GroundingTargets(positions, layout, coverage, torch.tensor([dropped, False]), 0.1)


def test_token_loss_is_0_inside_the_masks_and_1_outside():
    """TokenCompose's L_token: every grounded token's map entirely on its cells gives 0, entirely off
    them gives 1, half on them (1 - 1/2)^2 = 1/4; dropped captions are not grounded."""
    from nulltext.pocket.grounding import token_loss, token_shares

    targets = _one_object_targets()
    masks = targets.masks(4)  # [2, K, 16]
    assert targets.grounded[0].sum() == 4 + 3 and targets.grounded[1].sum() == 8 + 4  # object words + background noun
    cells = masks.transpose(1, 2)  # [2, 16 queries, K]
    ungrounded = torch.full((2, 16, 77 - cells.shape[-1]), 1 / 16)  # the other keys: spread evenly
    inside = torch.cat([cells / cells.sum(1, keepdim=True).clamp_min(1), ungrounded], -1)
    outside = torch.cat([(1 - cells) / (1 - cells).sum(1, keepdim=True), ungrounded], -1)
    assert token_loss([inside], targets).item() == pytest.approx(0.0, abs=1e-6)
    assert token_loss([outside], targets).item() == pytest.approx(1.0, abs=1e-6)
    half = 0.5 * (inside + outside)  # each grounded column: half of its mass on its cells
    shares = token_shares(half, masks)[targets.grounded]
    torch.testing.assert_close(shares, torch.full_like(shares, 0.5))
    assert token_loss([inside, half], targets).item() == pytest.approx((0 + 0.25) / 2, abs=1e-6)
    dropped = _one_object_targets(dropped=True)
    assert not dropped.grounded[0].any() and dropped.grounded[1].sum() == 12


def test_grounded_cells_follow_the_renderer():
    """An object's cells: its area-pooled coverage above 10% (its most covered cell always); the
    background words' cells are those of no object."""
    targets = _one_object_targets()
    masks = targets.masks(4).reshape(2, -1, 4, 4)
    red = masks[0, 3]  # BOS "a large red circle on the left": position 3 is the colour word
    blocks = targets.coverage[0, 0].reshape(4, 4, 4, 4).mean(dim=(1, 3))  # 16 px -> 4x4 cells of 4x4 px
    torch.testing.assert_close(red, (blocks > 0.1).float())
    assert red[1:3, 0].all() and red.sum() <= 4 and not red[:, 2:].any()  # x 0.06-0.31, y 0.38-0.63 of the side
    assert [masks[0, k].equal(red) for k in (2, 4, 7)] == [True] * 3  # size, shape and position words too
    assert not masks[0, [0, 1, 5, 6, 8, 9]].any()  # BOS, "a", "on the", "on a": not grounded
    background = masks[0, 10]  # "... on a plain gray background": BOS + 7 + "on a" -> the noun at 10-12
    torch.testing.assert_close(background, 1 - red)
    small = _one_object_targets(side_resolution=64).masks(2).reshape(2, -1, 2, 2)[1, 1 + 8 + 2]  # the small ring's colour word
    assert small.sum() == 1  # under 10% of any 32x32 px cell, yet it owns its most covered cell


def test_caption_positions_point_at_the_words():
    """The template positions name the tokens of the captions' words, for sampled layouts of 0-3 objects."""
    from nulltext.models import clip_tokenizer
    from nulltext.pocket.grounding import CaptionPositions
    from nulltext.scenes import BACKGROUND_KINDS, COLOURS, POSITIONS, SHAPES, SIZES, LayoutTokenizer, sample_layout

    tokenizer = clip_tokenizer()
    tokens = LayoutTokenizer(tokenizer)
    positions = CaptionPositions(tokens)
    layout = sample_layout(40, 3)
    layout = dataclasses.replace(layout, count=torch.where(torch.arange(40) < 4, 0, layout.count))  # 4 lone backgrounds
    ids = tokens(layout)
    words = positions.object_words(layout)
    start, end = positions.background_words(layout)
    single = lambda w: tokenizer(w, add_special_tokens=False).input_ids[0]  # noqa: E731
    for b in range(40):
        for j in range(int(layout.count[b])):
            expected = [SIZES[layout.size[b, j]], COLOURS[layout.colour[b, j]], SHAPES[layout.shape[b, j]], POSITIONS[layout.position[b, j]]]
            assert ids[b, words[b, j]].tolist() == [single(w) for w in expected]
        scene = layout[b].scenes()[0]
        noun = tokenizer(f"{scene.background_colour} {scene.background}", add_special_tokens=False).input_ids
        text = tokenizer.decode(ids[b, start[b] : end[b]])
        assert text.split()[-1] == "background" and scene.background_colour in text, text
        assert len(noun) >= 2 and int(ids[b, end[b]]) == tokens.eos  # the noun ends the caption
    assert int(layout.kind.unique().numel()) == len(BACKGROUND_KINDS)


def test_recording_processor_equals_the_default_attention():
    """The training processor (explicit softmax, maps kept with gradients) computes what diffusers'
    default processors compute, to float noise; the UNet's own processors are back after the block."""
    from diffusers.models.attention_processor import AttnProcessor

    from nulltext.pocket.grounding import recording_cross_attention

    cfg = _tiny_config(Path("/unused"), "p")
    unet = build_models(cfg)["unet"].eval()
    default = {k: type(v) for k, v in unet.attn_processors.items()}
    g = torch.Generator().manual_seed(0)
    z, context = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 16, generator=g)
    t = torch.tensor([10, 500, 990])
    with torch.no_grad():
        reference = unet(z, t, encoder_hidden_states=context).sample
        with recording_cross_attention(unet, ("down", "mid", "up")) as recorder:
            recorded = unet(z, t, encoder_hidden_states=context).sample
        assert {k: type(v) for k, v in unet.attn_processors.items()} == default
        unet.set_attn_processor(AttnProcessor())
        classic = unet(z, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(recorded, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recorded, classic, atol=1e-5, rtol=1e-5)
    # down 8x8, mid 4x4, up 8x8 (an up block has one layer more than a down block)
    assert [m.shape for m in recorder.maps] == [(3, 64, 77), (3, 16, 77), (3, 64, 77), (3, 64, 77)]
    torch.testing.assert_close(recorder.maps[0].sum(-1), torch.ones(3, 64))


def test_token_loss_gradients_reach_only_the_unet_and_text_encoder(trained, tmp_path):
    """The trainer's UNet-phase losses with grounding on: L_token's gradients reach the UNet's attention
    and the text encoder, never the autoencoder, nor the UNet layers after the last cross-attention."""
    whole, _, _ = trained
    trainer = Trainer(_tiny_config(tmp_path, "grad", vae_from=str(whole), grounding={"weight": 0.5}))
    losses = trainer.unet_losses(0)
    assert set(losses) == {"loss", "token_loss", "total"}
    assert losses["total"].item() == pytest.approx(losses["loss"].item() + 0.5 * losses["token_loss"].item(), rel=1e-6)
    assert 0 < losses["token_loss"].item() < 1
    losses["token_loss"].backward()
    unet, text, vae = (trainer.models[k] for k in ("unet", "text_encoder", "vae"))
    assert all(p.grad is None for p in vae.parameters())
    assert text.get_input_embeddings().weight.grad.abs().sum() > 0
    attn2 = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    assert attn2 and all(m.to_k.weight.grad.abs().sum() > 0 and m.to_q.weight.grad.abs().sum() > 0 for m in attn2)
    assert unet.conv_out.weight.grad is None  # after every map: nothing of L_token flows there
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())


def _ids(captions, length=77):
    from nulltext.models import clip_tokenizer

    return clip_tokenizer()(captions, padding="max_length", max_length=length, return_tensors="pt").input_ids


def test_position_classes_and_padding_losses_have_known_answers():
    """Start / words / EOS / padding positions of real token ids; the padding attention loss is the
    mass on EOS + padding (0 on start and words, 1 all on padding); the padding match loss is the
    relative squared distance to the empty caption's outputs over the padding of kept captions."""
    from nulltext.pocket.leak import padding_attention_loss, padding_match_loss, position_classes

    ids = _ids(["a red circle", ""])
    eos = int(ids[1, 1])
    classes = position_classes(ids, eos)
    assert classes[0, :6].tolist() == [0, 1, 1, 1, 2, 3] and classes[1, :3].tolist() == [0, 2, 3] and (classes[:, 6:] == 3).all()
    on_words = torch.zeros(2, 5, 77)
    on_words[..., 0] = 0.5
    on_words[0, :, 1:4] = 0.5 / 3
    on_words[1, :, 0] = 1.0
    on_padding = torch.zeros(2, 5, 77)
    on_padding[..., 30] = 1.0
    assert padding_attention_loss([on_words], ids, eos).item() == 0.0
    assert padding_attention_loss([on_padding], ids, eos).item() == 1.0
    assert padding_attention_loss([on_words, on_padding], ids, eos).item() == 0.5
    mixed = torch.where(torch.tensor([True, False])[:, None, None], on_words, on_padding)  # caption 1 (empty) on padding
    assert padding_attention_loss([mixed], ids, eos).item() == 0.5
    assert padding_attention_loss([mixed], ids, eos, skip=torch.tensor([False, True])).item() == 0.0  # the empty one skipped

    empty = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(0))
    outputs = empty.repeat(2, 1, 1)
    outputs[0, 1:5] += 3.0  # caption 0's words and EOS differ: not counted
    outputs[1, 1] += 3.0  # the empty caption's EOS
    assert padding_match_loss(outputs, empty, ids, eos, torch.tensor([False, False])).item() == 0.0
    outputs[0, 5:] = 2 * empty[0, 5:]  # caption 0's padding: ||2e - e||^2 / ||e||^2 = 1
    outputs[1, 2:] = -empty[0, 2:]  # caption 1 is dropped: ignored
    assert padding_match_loss(outputs, empty, ids, eos, torch.tensor([False, True])).item() == pytest.approx(1.0)


def test_empty_start_loss_has_known_answers_and_a_gradient_where_the_softmax_saturates():
    """The empty caption's start-token log-odds outside [logit(min), logit(max)] (0 inside, logit(0.9)
    - logit(0.8) at 0.9 above a ceiling of 0.8, logit(0.8) - logit(0.5) at 0.5 under a floor of 0.8,
    only the empty captions counted, 0 with none); at p_start = 1 - 1e-6 (a saturated softmax) the
    gradient wrt the logits does not vanish: +1 on the start token, -1 spread over the other keys in
    proportion to their shares (per query, / queries)."""
    import math

    from nulltext.pocket.leak import empty_start_loss

    def maps(p_start: float, n: int = 2) -> torch.Tensor:
        a = torch.full((n, 4, 77), (1 - p_start) / 76, dtype=torch.float64)
        a[..., 0] = p_start
        return a

    empty = torch.tensor([False, True])
    assert empty_start_loss([maps(0.8)], empty, 0.0, 0.8).item() == pytest.approx(0.0, abs=1e-9)
    assert empty_start_loss([maps(0.5)], empty, 0.0, 0.8).item() == 0.0
    assert empty_start_loss([maps(0.85)], empty, 0.8, 0.9).item() == 0.0
    above = math.log(9) - math.log(4)
    assert empty_start_loss([maps(0.9)], empty, 0.0, 0.8).item() == pytest.approx(above)
    assert empty_start_loss([maps(0.9), maps(0.5)], empty, 0.0, 0.8).item() == pytest.approx(above / 2)
    assert empty_start_loss([maps(0.5)], empty, 0.8, 0.9).item() == pytest.approx(math.log(4))
    above_in_kept_caption = torch.where(empty[:, None, None], maps(0.5), maps(0.99))
    assert empty_start_loss([above_in_kept_caption], empty, 0.0, 0.8).item() == 0.0
    assert empty_start_loss([maps(0.99)], torch.tensor([False, False]), 0.0, 0.8).item() == 0.0

    logits = torch.zeros(1, 4, 77, dtype=torch.float64)
    logits[..., 0] = math.log(1 - 1e-6) - math.log(1e-6 / 76)  # p_start = 1 - 1e-6
    logits[..., 5] += 1.0  # one other key weighs e times the rest
    logits.requires_grad_(True)
    empty_start_loss([logits.softmax(-1)], torch.tensor([True]), 0.0, 0.8).backward()
    rest = logits.detach()[0, 0, 1:].softmax(-1)
    assert logits.grad[0, 0, 0].item() == pytest.approx(1 / 4, rel=1e-5)
    assert torch.allclose(logits.grad[0, 0, 1:], -rest / 4, rtol=1e-4)


def test_padding_options_train_and_export_a_stock_loadable_model(trained, tmp_path):
    """With both padding losses and a 32-token context: the losses enter the total with their weights,
    the attention loss's gradients reach the UNet, the match loss's only the text encoder, a few steps
    on the attention loss alone halve the EOS + padding share of every cross-attention layer (grounded
    or not), and the exported model (tokenizer padding to 32) loads with
    the stock StableDiffusionPipeline, with diffusers' default attention processors, and samples."""
    from diffusers import StableDiffusionPipeline

    whole, _, _ = trained
    padding = {"attention_weight": 0.3, "match_weight": 0.2, "context_length": 32}
    trainer = Trainer(_tiny_config(tmp_path, "pad", vae_from=str(whole), padding=padding))
    losses = trainer.unet_losses(0)
    assert set(losses) == {"loss", "padding_attention_loss", "padding_match_loss", "total"}
    expected = losses["loss"] + 0.3 * losses["padding_attention_loss"] + 0.2 * losses["padding_match_loss"]
    assert losses["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    unet, text = trainer.models["unet"], trainer.models["text_encoder"]
    losses["padding_match_loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in unet.parameters()) and text.get_input_embeddings().weight.grad.abs().sum() > 0
    losses["padding_attention_loss"].backward()
    assert all(m.to_k.weight.grad.abs().sum() > 0 for n, m in unet.named_modules() if n.endswith("attn2"))

    def padding_shares():  # per cross-attention layer, the mass on EOS + padding (leak.attention_mass)
        from nulltext.diffusion import Diffusion
        from nulltext.pocket.export import assemble_pipeline
        from nulltext.pocket.leak import attention_mass, swapped_colour_scenes

        pipe = assemble_pipeline(trainer.models["vae"], unet, text, trainer.tokenizer, trainer.scaling_factor)
        mass = attention_mass(Diffusion(pipe, num_inference_steps=2), swapped_colour_scenes(2)[0], (500,))
        return torch.tensor([row["eos"] + row["padding"] for row in mass["layers"].values()])

    before = padding_shares()
    opt = torch.optim.Adam([*unet.parameters(), *text.parameters()], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        trainer.unet_losses(0)["padding_attention_loss"].backward()
        opt.step()
    after = padding_shares()
    assert len(before) == 4 and (after < 0.5 * before).all(), (before, after)  # every layer, the middle block's too

    out = train(_tiny_config(tmp_path, "pad", vae_from=str(whole), padding=padding, unet_train={"steps": 2}))
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.tokenizer.model_max_length == 32
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())
    images = pipe("a large red circle on the left on a plain gray background", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_empty_start_option_trains_the_empty_captions_start_share_down(trained, tmp_path):
    """``padding.empty_start_weight``: the loss enters the total with its weight on a batch with a
    dropped caption, and a few steps on it alone lower the empty caption's start-token share in
    every cross-attention layer (ceiling set under the tiny model's own share)."""
    from nulltext.diffusion import Diffusion
    from nulltext.pocket.batches import unet_batch_host
    from nulltext.pocket.export import assemble_pipeline
    from nulltext.pocket.leak import attention_mass, swapped_colour_scenes

    whole, _, _ = trained
    trainer = Trainer(_tiny_config(tmp_path, "empty", vae_from=str(whole), padding={"empty_start_weight": 0.5, "empty_start_max": 0.01}))
    unet, text = trainer.models["unet"], trainer.models["text_encoder"]
    step = next(s for s in range(100) if unet_batch_host(trainer.cfg, s, trainer.tokens)[2].any())

    def start_shares() -> torch.Tensor:
        pipe = assemble_pipeline(trainer.models["vae"], unet, text, trainer.tokenizer, trainer.scaling_factor)
        mass = attention_mass(Diffusion(pipe, num_inference_steps=2), swapped_colour_scenes(2)[0], (500,), empty_caption=True)
        return torch.tensor([row["start"] for row in mass["layers"].values()])

    losses = trainer.unet_losses(step)
    assert set(losses) == {"loss", "empty_start_loss", "total"} and losses["empty_start_loss"].item() > 0
    assert losses["total"].item() == pytest.approx((losses["loss"] + 0.5 * losses["empty_start_loss"]).item(), rel=1e-6)
    before = start_shares()
    opt = torch.optim.Adam([*unet.parameters(), *text.parameters()], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        trainer.unet_losses(step)["empty_start_loss"].backward()
        opt.step()
    after = start_shares()
    assert len(before) == 4 and (after < before).all(), (before, after)


def test_leak_measures_on_a_trained_model(trained, tmp_path):
    """Attention mass per layer (classes sum to 1, layers in call order) and the encoder change: a
    causal encoder cannot change the start token or the words before the swapped one; the command
    (scripts/measure_pocket_leak.py) writes them."""
    import json
    import math

    from nulltext.diffusion import Diffusion
    from nulltext.models import load_pipeline
    from nulltext.pocket.leak import POSITION_CLASSES, attention_mass, encoder_change, main, markdown, start_spread, swapped_colour_scenes

    whole, _, _ = trained
    diffusion = Diffusion(load_pipeline(str(whole)), num_inference_steps=2)
    scenes, targets = swapped_colour_scenes(2)
    mass = attention_mass(diffusion, scenes, (900, 100))
    assert [row["side"] for row in mass["layers"].values()] == [8, 4, 8, 8]  # down, mid, up, up
    for row in [*mass["layers"].values(), mass["mean"]]:
        assert sum(row[c] for c in POSITION_CLASSES) == pytest.approx(1.0, abs=1e-5)
    change = encoder_change(diffusion, scenes, targets)
    assert change["start"] == 0.0 and change["earlier words"] == 0.0 and change["swapped word"] > 0
    assert "| **mean over layers** |" in markdown({"model": "tiny", "attention_mass": mass, "encoder_change": change})
    # The empty caption has no words. The start token's spread over pixels: 0 when every pixel weighs
    # it alike; weights [1, 1, 0, 0] over four pixels give the sample std sqrt(1/3).
    empty = attention_mass(diffusion, scenes, (900, 100), empty_caption=True)
    assert all(row["words"] == 0.0 for row in empty["layers"].values())
    alike, split = torch.full((2, 4, 5), 0.2), torch.zeros(2, 4, 5)
    split[:, :2, 0], split[:, 2:, 1] = 1.0, 1.0
    assert start_spread(alike).item() == 0.0 and start_spread(split).item() == pytest.approx(math.sqrt(1 / 3))
    assert empty["captions"] == ["", ""]
    main(["--model", str(whole), "--out", str(tmp_path), "--scenes", "2", "--timesteps", "900", "100"])
    written = json.loads((tmp_path / "leak.json").read_text())
    assert written["attention_mass"] == mass and written["attention_mass_empty"] == empty
    assert "## The empty caption" in (tmp_path / "leak.md").read_text()


@pytest.mark.parametrize("setting, message", [
    ({"grounding": {"weight": -1.0}}, "grounding.weight=-1.0 is not allowed"),
    ({"grounding": {"places": ["middle"]}}, "grounding.places=['middle'] is not allowed"),
    ({"grounding": {"cell_threshold": 2}}, "grounding.cell_threshold=2.0 is not allowed"),
    ({"padding": {"attention_weight": -0.1}}, "padding.attention_weight=-0.1 is not allowed"),
    ({"padding": {"context_length": 30}}, "padding.context_length=30 is not allowed"),
    ({"padding": {"empty_start_max": 1.0}}, "padding.empty_start_max=1.0 is not allowed"),
    ({"padding": {"empty_start_min": 0.9, "empty_start_max": 0.8}}, "padding.empty_start_min=0.9 is not allowed"),
    ({"run_dir": None, "run_name": "a/b"}, "run_name='a/b' is not allowed"),
])
def test_bad_recipe_settings_are_one_line_errors(tmp_path, setting, message):
    from nulltext.validation import SettingError

    with pytest.raises(SettingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        train(_tiny_config(tmp_path, "bad", **setting))


def test_gpu_recipe_trains_on_the_committed_h200_autoencoder():
    """The GPU recipe's default vae_from is the committed autoencoder, whose architecture is the recipe's."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_pocket", overrides=["device=cpu", f"vae_from={ROOT / 'models' / 'pocket-vae-h200'}"])
    trainer = Trainer(cfg)
    assert trainer.phase == "unet" and trainer.scaling_factor == pytest.approx(0.47744476795196533, abs=0)
    assert weights_sha256(trainer.vae_source) == "251f642dd652d3f0eb2a8de8ee362073805cd2449badb49d1e12aa00e6b72fe1"


@pytest.mark.parametrize("config_name, source, side", [
    ("train_pocket_cpu_grounded", ROOT / "models" / "pocket-vae-h200" / "vae", 16),
    ("train_pocket_cpu_grounded2", ROOT / "models" / "pocket-vae-h200" / "vae", 16),
    ("train_pocket_cpu_grounded32", ROOT / "models" / "pocket-vae-cpu32" / "vae", 8),
])
def test_grounded_cpu_recipes_train_on_the_committed_autoencoders(config_name, source, side, tmp_path):
    """The new stand-in's recipes: a fresh UNet on the committed autoencoder (its scaling factor),
    grounding and the padding attention loss on, checkpoints in the cache, the model not into models/."""
    import json

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name)
    assert (cfg.grounding.weight, cfg.padding.attention_weight, cfg.padding.match_weight, cfg.padding.context_length) == (0.5, 0.2, 0.0, 77)
    assert cfg.run_dir is None and cfg.run_name == cfg.profile and not cfg.output_dir.startswith("models")
    # The second 64 px run keeps the padding loss off the empty caption (null-text's handle there).
    assert cfg.padding.get("attention_on_empty", True) == (config_name != "train_pocket_cpu_grounded2")
    cfg.vae_from = str(ROOT / cfg.vae_from)
    trainer = Trainer(cfg)
    assert trainer.phase == "unet" and trainer.models["unet"].config.sample_size == side
    assert trainer.scaling_factor == json.loads((source / "config.json").read_text())["scaling_factor"]


def test_grounded_continue_recipe_trains_the_shipped_model_further(tmp_path):
    """The second stage on the shipped grounded model (models/pocket): its weights and scaling factor loaded, the padding
    loss off the empty captions and the empty caption's start share capped."""
    import json

    from hydra import compose, initialize_config_dir

    from nulltext.models import load_pipeline

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_pocket_cpu_grounded_continue", overrides=[f"run_dir={tmp_path / 'run'}"])
    assert cfg.vae_from is None and not cfg.padding.attention_on_empty and cfg.padding.empty_start_weight > 0
    assert 0 < cfg.padding.empty_start_min <= cfg.padding.empty_start_max < 1
    cfg.init_from = str(ROOT / cfg.init_from)
    trainer = Trainer(cfg)
    source = POCKET
    assert trainer.phase == "unet" and trainer.models["unet"].config.sample_size == 16
    assert trainer.scaling_factor == json.loads((source / "vae" / "config.json").read_text())["scaling_factor"]
    saved = load_pipeline(str(source)).vae.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in trainer.models["vae"].state_dict().items())


def _head_widths(pipe_or_models) -> dict[str, tuple[int, int]]:
    """(heads, channels per head) of every attention module of a UNet, read from the built modules,
    and of every layer of the text encoder."""
    from diffusers.models.attention_processor import Attention
    from transformers.models.clip.modeling_clip import CLIPAttention

    unet, text = pipe_or_models["unet"], pipe_or_models["text_encoder"]
    out = {f"unet.{n}": (m.heads, m.inner_dim // m.heads) for n, m in unet.named_modules() if isinstance(m, Attention)}
    out.update({f"text_encoder.{n}": (m.num_heads, m.head_dim) for n, m in text.named_modules() if isinstance(m, CLIPAttention)})
    return out


@pytest.mark.parametrize("config_name", ["train_pocket", "train_pocket_cpu", "train_pocket_cpu_continue",
                                         "train_pocket_cpu_grounded", "train_pocket_cpu_grounded2", "train_pocket_cpu_grounded32",
                                         "train_pocket_cpu_grounded_continue"])
def test_training_recipes_have_at_least_32_channels_per_head(config_name):
    """diffusers reads attention_head_dim as a head COUNT: check what the modules are, not the name."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=["init_from=null"] if "continue" in config_name else [])
    widths = _head_widths(build_models(cfg))
    assert sum(k.startswith("unet.") for k in widths) >= 2 and sum(k.startswith("text_encoder.") for k in widths) >= 2
    narrow = {k: v for k, v in widths.items() if v[1] < 32}
    assert not narrow, narrow


@needs_pocket
def test_shipped_pocket_has_at_least_32_channels_per_head():
    from nulltext.pocket import load_pocket

    pipe = load_pocket()
    widths = _head_widths({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    narrow = {k: v for k, v in widths.items() if v[1] < 32}
    assert not narrow, narrow


def test_evaluation_script_reports_every_part(trained, tmp_path):
    """The evaluation (scripts/evaluate_pocket_model.py) on the tiny trained folder: each part present and consistent."""
    import json
    import math

    whole, _, _ = trained
    args = ["--model", str(whole), "--out", str(tmp_path), "--steps", "2", "--text-images", "2", "--vae-images", "2",
            "--inv-images", "1", "--photos", "astronaut", "--no-photo-n20", "--no-global", "--attention-images", "2"]
    evaluation.main(args)
    report = json.loads((tmp_path / "pocket_eval.json").read_text())
    assert {"text_control", "autoencoder_scenes", "inversion_scenes", "inversion_photos", "attention_localisation"} <= report.keys()
    assert 0 <= report["text_control"]["guidance_7.5"]["object_colour"] <= 1
    loc = report["attention_localisation"]
    assert loc["map_side"] == 8 and len(loc["per_image_ratio"]) == 2  # 16 px, VAE factor 2: the 8x8 maps, the finest
    assert 0 < loc["area"] < 1 and 0 <= loc["inside"] <= 1 and math.isfinite(loc["ratio"])
    assert loc["ratio"] == pytest.approx(sum(loc["per_image_ratio"]) / 2)
    # the targets are read from the measured numbers
    scenes = report["inversion_scenes"]
    assert report["checks"]["scenes: ddim@7.5 < null-text N=10"] == (scenes["ddim"]["psnr"] < scenes["null_text_N10"]["psnr"])
    ae = report["autoencoder_scenes"]
    assert ae["margin_db"] == pytest.approx(ae["vae_psnr"] - ae["down_up_psnr"])
    assert "## (iv) Editability" in (tmp_path / "pocket_eval.md").read_text()


@needs_pocket
def test_shipped_pocket_is_small_and_loads_from_its_config(tmp_path, monkeypatch):
    from hydra.utils import instantiate

    size = sum(f.stat().st_size for f in POCKET.rglob("*") if f.is_file())
    assert size <= 45 * 2**20, f"models/pocket is {size / 2**20:.1f} MiB"
    monkeypatch.chdir(tmp_path)  # the model config must not depend on the working directory
    pipe = instantiate(OmegaConf.load(ROOT / "conf" / "model" / "pocket.yaml"))
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert abs(pipe.vae.config.scaling_factor - 0.18215) > 1e-6  # measured, not SD's constant


@needs_pocket
@pytest.mark.slow
def test_pocket_null_text_beats_ddim_inversion_under_the_vae_bound():
    """The paper's ordering on two held-out scenes (as scripts/evaluate_pocket_model.py measures it):
    DDIM inversion sampled at 7.5 well below null-text, null-text below the VAE bound. How far below
    is the shipped model's, not the method's: 5.8 dB here (VAE 38.90, null-text 33.06 dB, 2026-12-06)
    because its unconditional branch attends only to the start token (models/pocket/README.md, top;
    on stand-in 2 it was within 0.2 dB); the bound on the gap guards that figure."""
    from nulltext.diffusion import Diffusion
    from nulltext.methods import DDIMInversion, NullTextInversion, VAEReconstruction, image_seed
    from nulltext.metrics import psnr_per_image
    from nulltext.models import pipeline_resolution
    from nulltext.pocket import load_pocket
    from nulltext.reconstruction import reconstruct
    from nulltext.scenes import ScenesDataset

    torch.set_num_threads(1)
    pipe = load_pocket()
    diffusion = Diffusion(pipe, num_inference_steps=50, guidance_scale=7.5)
    data = ScenesDataset(pipeline_resolution(pipe), num_images=2, seed=2, split="heldout")
    items = [data[i] for i in range(len(data))]
    images = torch.stack([it["image"] for it in items])
    captions = [it["caption"] for it in items]
    seeds = [image_seed(0, it["id"]) for it in items]
    z0 = diffusion.encode_images(images)

    def psnr(method) -> float:
        rec = reconstruct(diffusion, method.invert(diffusion, z0, captions, seeds)).images
        return psnr_per_image(rec.float() / 255, images.float() / 255).mean().item()

    vae, ddim, nti = psnr(VAEReconstruction()), psnr(DDIMInversion()), psnr(NullTextInversion(num_inner_steps=10))
    assert ddim + 3.0 < nti < vae, (ddim, nti, vae)
    assert vae - nti <= 7.0, (vae, nti)


@needs_pocket
@pytest.mark.slow
@pytest.mark.parametrize(
    "source, target, shape, background",
    [("red", "blue", "circle", "gray"), ("blue", "yellow", "diamond", "pink")],
)
def test_pocket_colour_swap_edit_recolours_the_object(source, target, shape, background):
    """A one-object scene rendered by nulltext.scenes, null-text inverted, edited by Prompt-to-Prompt
    word replacement of its colour word (default windows): the checker reads the target colour at
    the object's place and no longer the source colour, and outside the object (dilated by 3 px) the
    edit keeps the reconstruction to 26 dB PSNR (measured on the shipped model, no local blend: 28.86
    and 30.89 dB; on stand-in 2, whose cross-attention was not localised, 17-27 dB). With a local
    blend and against the reconstruction's own PSNR: the next test."""
    import torch.nn.functional as F

    from nulltext.diffusion import Diffusion
    from nulltext.editing import edit
    from nulltext.editing.metrics import masked_psnr
    from nulltext.methods import NullTextInversion
    from nulltext.models import pipeline_resolution
    from nulltext.pocket import load_pocket
    from nulltext.scenes import Scene, SceneChecker, SceneObject, layout_from_scenes, render_layout

    torch.set_num_threads(1)
    pipe = load_pocket()
    res = pipeline_resolution(pipe)
    diffusion = Diffusion(pipe, num_inference_steps=50, guidance_scale=7.5)
    scene = Scene((SceneObject(shape, source, "large", "center"),), "plain", background)
    edited_scene = Scene((SceneObject(shape, target, "large", "center"),), "plain", background)
    image = render_layout(layout_from_scenes([scene], seed=0, jitter=False), res)
    empty = render_layout(layout_from_scenes([Scene((), "plain", background)], seed=0, jitter=False), res)
    inversion = NullTextInversion(num_inner_steps=10).invert(diffusion, diffusion.encode_images(image), [scene.caption], [0])
    out = edit(diffusion, inversion, [edited_scene.caption], {"mode": "replace"})
    recon, edited = out.images[:1], out.images[1:]

    checker = SceneChecker(resolution=res)
    assert checker(recon, [scene]).colour_ok.item()  # the reconstruction shows the source colour
    result = checker(edited, [edited_scene])
    assert result.colour_ok.item() and result.position_ok.item()
    assert not checker(edited, [scene]).colour_ok.item()

    obj = ((image.float() - empty.float()).abs().amax(1, keepdim=True) > 0).float()
    background_mask = 1 - F.max_pool2d(obj, 7, stride=1, padding=3)
    psnr = masked_psnr(edited.float() / 255, recon.float() / 255, background_mask).item()
    assert psnr >= 26.0, psnr


@needs_pocket
@pytest.mark.slow
def test_pocket_colour_swaps_keep_the_background_within_2_db_of_the_reconstruction():
    """Issue 17's bar as a test, on 8 held-out edit_bench cases other than the ship check's (seed 3,
    not 0): null-text with the official settings, Prompt-to-Prompt word swap of the colour word with
    its default windows and a local blend on [source, target], the published rule (the edited row
    guided from the inversion's own null embeddings). The scene checker reads the target caption in
    at least 7 of 8 edits, and outside the edited object (its exact pixels, dilated 1 px:
    PIE-Bench's background region) the edits keep the input as well as the reconstruction keeps the
    whole image, within 2 dB on average and 4 dB in every case (measured: models/pocket/README.md)."""
    from nulltext.diffusion import Diffusion
    from nulltext.editing.benchmark import EditScorer, colour_swap_cases, edit_cases
    from nulltext.methods import NullTextInversion, image_seed
    from nulltext.models import pipeline_resolution
    from nulltext.pocket import load_pocket

    torch.set_num_threads(1)
    pipe = load_pocket()
    diffusion = Diffusion(pipe, num_inference_steps=50, guidance_scale=7.5)
    cases = colour_swap_cases(8, pipeline_resolution(pipe), seed=3)
    inversion = NullTextInversion(num_inner_steps=10).invert(
        diffusion, diffusion.encode_images(cases.images), cases.captions, [image_seed(3, i) for i in cases.ids]
    )
    rows = EditScorer(cases).score(*edit_cases(diffusion, inversion, cases, {"mode": "replace"}, local_blend=True))
    gaps = [r["recon_psnr"] - r["background_psnr"] for r in rows]
    assert sum(r["success"] for r in rows) >= 7, rows
    assert sum(gaps) / len(gaps) <= 2.0 and max(gaps) <= 4.0, gaps


@needs_pocket
@pytest.mark.slow
def test_shipped_pocket_text_control_and_attention_as_recorded():
    """Text control (48 held-out scenes, guidance 7.5 and 1) and the attention ratio (8 one-object
    scenes) of the shipped model, measured again with the evaluation script's own functions: they
    reproduce the model card's recorded numbers (models/pocket/eval/pocket_eval.json, within one
    object / 2%), guidance 7.5 beats guidance 1 on colour and position, and a GPU-trained model
    (training.json's device) meets the targets."""
    import json

    from nulltext.diffusion import Diffusion
    from nulltext.models import pipeline_resolution
    from nulltext.pocket import load_pocket

    recorded = json.loads((POCKET / "eval" / "pocket_eval.json").read_text())
    torch.set_num_threads(1)
    pipe = load_pocket()
    res = pipeline_resolution(pipe)
    diffusion = Diffusion(pipe, num_inference_steps=recorded["steps"], guidance_scale=7.5)

    tc = evaluation.text_control(diffusion, res, recorded["text_control"]["images"], recorded["seed"], 48, [7.5, 1.0])
    objects = sum(len(s.objects) for s in evaluation.ScenesDataset(res, num_images=recorded["text_control"]["images"], seed=recorded["seed"], split="heldout").attributes)
    for scale in ("7.5", "1"):
        for name in ("colour", "position", "shape"):
            got, want = tc[f"guidance_{scale}"][f"object_{name}"], recorded["text_control"][f"guidance_{scale}"][f"object_{name}"]
            assert abs(got - want) <= 1.01 / objects, (scale, name, got, want)
    high, low = tc["guidance_7.5"], tc["guidance_1"]
    assert high["object_colour"] > low["object_colour"] and high["object_position"] > low["object_position"]

    loc = evaluation.attention_localisation(diffusion, res, recorded["attention_localisation"]["images"], recorded["seed"])
    assert loc["ratio"] == pytest.approx(recorded["attention_localisation"]["ratio"], rel=0.02)

    if json.loads((POCKET / "training.json").read_text())["device"].startswith("cuda"):
        for name, floor in evaluation.TEXT_CONTROL_TARGETS.items():
            assert high[f"object_{name}"] >= floor and high[f"object_{name}"] > low[f"object_{name}"], name
        assert loc["ratio"] >= evaluation.ATTENTION_RATIO_TARGET


@needs_pocket
def test_ship_check_reads_its_verdict_from_the_measurements(tmp_path):
    """scripts/pocket_ship_check.py on the shipped stand-in against itself, 2 DDIM steps: each criterion
    recomputed here from the evaluation's and edit_bench's own files; 2 attention scenes fall short of
    the bar's 32, so it does not ship."""
    import json

    from nulltext.pocket import ship

    status = ship.main(["--model", ship.pocket_path(), "--out", str(tmp_path), "--steps", "2", "--cases", "1", "--attention-images", "2", "--text-images", "2",
                       "--edit-bench", "blend_resolution=8"])
    result = json.loads((tmp_path / "ship_check.json").read_text())
    rows = {r["criterion"]: r for r in result["criteria"]}
    report = json.loads((tmp_path / "pocket_eval.json").read_text())
    nti = json.loads((tmp_path / "edit_bench" / "edit_bench.json").read_text())["summary"]["null_text"]
    reference = json.loads((Path(ship.pocket_path()) / "eval" / "pocket_eval.json").read_text())["text_control"]["guidance_7.5"]
    assert rows["attention ratio"]["measured"] == report["attention_localisation"]["ratio"]
    assert rows["attention ratio"]["holds"] is False  # 2 scenes < 32, whatever the ratio
    gap = nti["recon_psnr"] - nti["background_psnr"]
    assert rows["reconstruction minus background PSNR (dB)"] == {**rows["reconstruction minus background PSNR (dB)"], "measured": gap, "holds": gap <= 2.0}
    assert rows["edit footprint"]["holds"] == (nti["footprint"] <= 0.15)
    assert rows["null-text + P2P edit success"]["holds"] == (nti["success"] >= 0.8)
    colour = report["text_control"]["guidance_7.5"]["object_colour"]
    assert rows["text control @7.5, colour"]["holds"] == (colour >= reference["object_colour"])
    assert result["ships"] is False and status == 1
    assert "Verdict: does not ship." in (tmp_path / "ship_check.md").read_text()
