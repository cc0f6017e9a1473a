"""Tests for nulltext.scenes: vocabulary, splits, determinism, captions, rendering, the dataset
and its config, and the SceneChecker (validated on clean renders, and made to fail on wrong
attributes)."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nulltext.data import InversionDataModule
from nulltext.errors import NulltextError
from nulltext.scenes import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOUR_RGB,
    COLOURS,
    HELD_OUT_PAIRS,
    MAX_OBJECTS,
    POSITION_CENTRES,
    POSITIONS,
    SHAPES,
    SIZE_RADII,
    SIZES,
    TRAIN_PAIRS,
    JITTER,
    Scene,
    SceneChecker,
    SceneObject,
    ScenesDataset,
    layout_from_scenes,
    render_layout,
    render_scenes,
    rgb_to_lab,
    sample_layout,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.fixture(scope="module")
def checker() -> SceneChecker:
    return SceneChecker()


# ------------------------------------------------------------------------------------------
# Vocabulary and splits
# ------------------------------------------------------------------------------------------


def test_vocabulary_sizes_and_disjoint_palettes():
    assert len(SHAPES) == 6 and len(COLOURS) == 8 and len(SIZES) == 2 and len(POSITIONS) == 5
    assert len(BACKGROUND_KINDS) == 5 and len(BACKGROUND_COLOURS) == 5
    assert not set(COLOURS) & set(BACKGROUND_COLOURS)
    assert set(COLOUR_RGB) == set(COLOURS)
    # every word of the vocabulary is a distinct single token of the captions
    words = [*SHAPES, *COLOURS, *SIZES, *BACKGROUND_COLOURS]
    assert len(set(words)) == len(words) and all(" " not in w for w in words)
    lab = rgb_to_lab(torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float64))
    d = torch.cdist(lab, lab) + torch.eye(len(COLOURS)) * 1e9
    assert float(d.min()) > 35  # object colours far apart in CIELAB


def test_held_out_pairs_leave_every_colour_and_shape_in_training():
    assert len(HELD_OUT_PAIRS) == 6 and len(set(HELD_OUT_PAIRS)) == 6
    assert all(c in COLOURS and s in SHAPES for c, s in HELD_OUT_PAIRS)
    assert {c for c, _ in TRAIN_PAIRS} == set(COLOURS)
    assert {s for _, s in TRAIN_PAIRS} == set(SHAPES)
    assert len(TRAIN_PAIRS) == len(COLOURS) * len(SHAPES) - 6
    assert not set(TRAIN_PAIRS) & set(HELD_OUT_PAIRS)


def test_train_never_holds_out_pair_and_heldout_always_does():
    train = sample_layout(2000, seed=0, split="train").scenes()
    assert not any((o.colour, o.shape) in HELD_OUT_PAIRS for s in train for o in s.objects)
    # the training split still covers the whole vocabulary
    assert {o.colour for s in train for o in s.objects} == set(COLOURS)
    assert {o.shape for s in train for o in s.objects} == set(SHAPES)
    assert {o.position for s in train for o in s.objects} == set(POSITIONS)
    assert {o.size for s in train for o in s.objects} == set(SIZES)
    assert {s.background for s in train} == set(BACKGROUND_KINDS)
    assert {s.background_colour for s in train} == set(BACKGROUND_COLOURS)
    assert {len(s.objects) for s in train} == {1, 2, 3}

    heldout = sample_layout(2000, seed=0, split="heldout").scenes()
    held = [sum((o.colour, o.shape) in HELD_OUT_PAIRS for o in s.objects) for s in heldout]
    assert all(h == 1 for h in held)  # exactly one held-out object per scene
    assert {(o.colour, o.shape) for s in heldout for o in s.objects if o.held_out} == set(
        HELD_OUT_PAIRS
    )
    # the held-out object is not always first in the caption
    assert len({[o.held_out for o in s.objects].index(True) for s in heldout}) == 3


def test_positions_distinct_and_objects_never_touch():
    layout = sample_layout(2000, seed=1, split="train")
    for scene in layout.scenes():
        positions = [o.position for o in scene.objects]
        assert len(set(positions)) == len(positions)
    # every shape lies inside its box of half-size r (jitter included): boxes of two objects
    # of a scene are at least one 64-px pixel apart
    centres = torch.tensor([POSITION_CENTRES[p] for p in POSITIONS], dtype=torch.float64)
    radii = torch.tensor([SIZE_RADII[s] for s in SIZES], dtype=torch.float64)
    c = centres[layout.position] + layout.offset
    r = radii[layout.size]
    assert float(layout.offset.abs().max()) <= JITTER
    for i, j in itertools.combinations(range(MAX_OBJECTS), 2):
        both = layout.valid[:, i] & layout.valid[:, j]
        gap = (c[:, i] - c[:, j]).abs().max(dim=1).values - (r[:, i] + r[:, j])
        assert float(gap[both].min()) >= 1 / 64


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(NulltextError, match="split"):
        render_scenes(2, seed=0, split="test")
    with pytest.raises(NulltextError, match="seed"):
        sample_layout(2, seed="0")
    with pytest.raises(NulltextError, match="colour"):
        SceneObject("circle", "magenta", "small", "left")
    with pytest.raises(NulltextError, match="distinct positions"):
        Scene((SceneObject("circle", "red", "small", "left"),) * 2, "plain", "pink")
    with pytest.raises(NulltextError, match="resolution"):
        ScenesDataset(resolution=0)


def test_layout_tokenizer_equals_the_clip_tokenizer_on_the_captions():
    """The tensor token ids of training batches are exactly what the real CLIP tokenizer makes of the
    captions (BOS, words, EOS, EOS padding), for 1-3 objects and for a scene without objects."""
    from nulltext.models import clip_tokenizer
    from nulltext.scenes import LayoutTokenizer

    tokenizer = clip_tokenizer()
    tokens = LayoutTokenizer(tokenizer)
    layouts = [sample_layout(600, seed=7, split="train"), sample_layout(300, seed=8, split="heldout"),
               layout_from_scenes([Scene((), "stripes", "pink"), Scene((), "plain", "gray")])]
    for layout in layouts:
        real = tokenizer(layout.captions(), padding="max_length", max_length=77, truncation=True).input_ids
        assert tokens(layout).tolist() == real
    assert set(layouts[0].count.tolist()) == {1, 2, 3}
    assert tokens.empty.tolist() == tokenizer("", padding="max_length", max_length=77).input_ids


# ------------------------------------------------------------------------------------------
# Determinism, rendering, captions
# ------------------------------------------------------------------------------------------


def test_same_seed_same_scenes_other_seed_other_scenes():
    a = render_scenes(32, seed=5, split="heldout")
    b = render_scenes(32, seed=5, split="heldout")
    assert torch.equal(a.images, b.images)
    assert a.captions == b.captions and a.scenes == b.scenes
    c = render_scenes(32, seed=6, split="heldout")
    assert c.captions != a.captions
    assert (c.images != a.images).flatten(1).any(1).all()  # every image differs
    # scene i does not depend on n, the split has its own stream, attributes not on resolution
    first = render_scenes(8, seed=5, split="heldout")
    assert torch.equal(first.images, a.images[:8]) and first.captions == a.captions[:8]
    assert render_scenes(8, seed=5, split="train").captions != first.captions
    assert render_scenes(8, seed=5, resolution=32, split="heldout").scenes == first.scenes


def test_render_shapes_dtype_and_flat_object_colours():
    images, captions, scenes = render_scenes(64, seed=2, resolution=48)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (64, 3, 48, 48)
    assert len(captions) == len(scenes) == 64
    # jitter-free large objects: the pixel at the object's centre has exactly its colour
    large = [
        Scene((SceneObject(s, c, "large", p),), "noise", "gray")
        for s, c, p in zip(SHAPES * 2, COLOURS + COLOURS[:4], POSITIONS * 3)
    ]
    images = render_layout(layout_from_scenes(large, jitter=False), resolution=64)
    for image, scene in zip(images, large):
        o = scene.objects[0]
        x, y = (int(v * 64) for v in POSITION_CENTRES[o.position])
        y += 2 if o.shape == "triangle" else 0  # the box centre of a triangle is near its apex
        if o.shape == "ring":
            x += 5  # inside the band, not the hole
        assert tuple(image[:, y, x].tolist()) == COLOUR_RGB[o.colour], (o, image[:, y, x])


def _expected_caption(scene: Scene) -> str:
    where = {
        "left": "on the left",
        "right": "on the right",
        "center": "in the center",
        "top": "at the top",
        "bottom": "at the bottom",
    }
    phrases = [f"a {o.size} {o.colour} {o.shape} {where[o.position]}" for o in scene.objects]
    joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    background = {
        "plain": f"plain {scene.background_colour}",
        "gradient": f"{scene.background_colour} gradient",
        "stripes": f"striped {scene.background_colour}",
        "checker": f"checkered {scene.background_colour}",
        "noise": f"mottled {scene.background_colour}",
    }[scene.background]
    return f"{joined} on a {background} background"


def test_captions_mention_every_object_with_its_words():
    for split in ("train", "heldout"):
        layout = sample_layout(500, seed=3, split=split)
        captions, scenes = layout.captions(), layout.scenes()
        for caption, scene in zip(captions, scenes):
            assert caption == _expected_caption(scene) == scene.caption
            words = caption.split()
            # one size, colour and shape word per object, in caption order
            assert [w for w in words if w in SHAPES] == [o.shape for o in scene.objects]
            assert [w for w in words if w in COLOURS] == [o.colour for o in scene.objects]
            assert [w for w in words if w in SIZES] == [o.size for o in scene.objects]
            assert words.count(scene.background_colour) == 1
            assert re.fullmatch(r"[a-z ,]+", caption)


def test_scene_dict_round_trip_and_zero_object_caption():
    scene = sample_layout(3, seed=0).scenes()[2]
    assert Scene.from_dict(scene.as_dict()) == scene
    assert Scene((), "checker", "teal").caption == "a checkered teal background"


# ------------------------------------------------------------------------------------------
# Dataset and config
# ------------------------------------------------------------------------------------------


def test_dataset_conventions_and_determinism():
    ds = ScenesDataset(resolution=64, num_images=6, seed=4)
    assert len(ds) == 6 and ds.resolution == 64
    assert ds.ids == [f"scene-{i:04d}" for i in range(6)]
    ref = render_scenes(6, seed=4, resolution=64, split="heldout")
    assert ds.captions == ref.captions and ds.attributes == ref.scenes
    assert all(s.held_out for s in ds.attributes)
    for i in (0, 5, -1):
        item = ds[i]
        assert set(item) == {"id", "image", "caption"}
        assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (3, 64, 64)
        assert item["id"] == ds.ids[i] and item["caption"] == ds.captions[i]
        assert int((item["image"].int() - ref.images[i].int()).abs().max()) <= 1
    with pytest.raises(IndexError):
        ds[6]
    limited = ScenesDataset(resolution=32, num_images=6, seed=4, limit=2)
    assert limited.ids == ds.ids[:2] and limited.captions == ds.captions[:2]
    assert len(limited.attributes) == 2


def test_config_instantiates_and_yields_items():
    # `seed: ${seed}` resolves against the root config (conf/config.yaml has `seed: 0`)
    cfg = OmegaConf.create({"seed": 0, "data": OmegaConf.load(CONF / "scenes.yaml")})
    dm = instantiate(cfg.data, resolution=64)
    assert isinstance(dm, InversionDataModule) and isinstance(dm.dataset, ScenesDataset)
    assert len(dm.dataset) == 16 and dm.resolution == 64
    assert dm.ids[0] == "scene-0000" and dm.captions == dm.dataset.captions
    batch = next(iter(dm.test_dataloader()))
    assert batch["ids"] == ["scene-0000"] and not batch["failures"]
    assert tuple(batch["images"].shape) == (1, 3, 64, 64)
    assert batch["captions"][0] == dm.dataset.attributes[0].caption
    cfg.data.limit = 3
    cfg.seed = 1
    dm = instantiate(cfg.data, resolution=32)
    assert len(dm.dataset) == 3 and dm.dataset.resolution == 32 and dm.dataset.seed == 1
    assert dm.captions == ScenesDataset(32, num_images=3, seed=1).captions


# ------------------------------------------------------------------------------------------
# Checker
# ------------------------------------------------------------------------------------------


def test_checker_accurate_on_clean_renders(checker):
    held = render_scenes(500, seed=11, split="heldout")
    train = render_scenes(500, seed=12, split="train")
    images = torch.cat([held.images, train.images])
    result = checker(images, held.scenes + train.scenes)
    acc = result.accuracy()
    assert acc["object_colour"] >= 0.99 and acc["object_position"] >= 0.99, acc
    assert acc["object_shape"] >= 0.95, acc
    assert acc["image_colour"] >= 0.99 and acc["image_position"] >= 0.99, acc
    assert acc["image_shape"] >= 0.95, acc
    assert result.colour_ok.shape == (1000,) and result.object_colour_ok.shape == (1000, 3)
    assert not (result.object_colour_ok & ~result.object_valid).any()


def _replace_first(scenes, rng, change):
    out = []
    for scene in scenes:
        first = change(scene, scene.objects[0], rng)
        out.append(dataclasses.replace(scene, objects=(first, *scene.objects[1:])))
    return out


def test_checker_fails_on_wrong_attributes(checker):
    images, _, scenes = render_scenes(200, seed=13, split="heldout")
    rng = random.Random(0)

    def other_colour(scene, o, rng):
        used = {x.colour for x in scene.objects}
        return dataclasses.replace(o, colour=rng.choice([c for c in COLOURS if c not in used]))

    def other_position(scene, o, rng):
        used = {x.position for x in scene.objects}
        free = [p for p in POSITIONS if p not in used]
        return dataclasses.replace(o, position=rng.choice(free))

    def other_shape(scene, o, rng):
        return dataclasses.replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))

    wrong = {
        "colour": _replace_first(scenes, rng, other_colour),
        "position": _replace_first(scenes, rng, other_position),
        "shape": _replace_first(scenes, rng, other_shape),
    }
    background = render_layout(
        layout_from_scenes([dataclasses.replace(s, objects=()) for s in scenes], seed=13), 64
    )
    n = len(scenes)
    result = checker(
        torch.cat([images, images, images, background]),
        wrong["colour"] + wrong["position"] + wrong["shape"] + scenes,
    )
    colour, position, shape, empty = (slice(i * n, (i + 1) * n) for i in range(4))
    # a colour absent from the image is never found
    assert result.object_colour_ok[colour, 0].float().mean() <= 0.02
    assert result.colour_ok[colour].float().mean() <= 0.02
    # the right colour is found but at another place
    assert result.object_colour_ok[position, 0].all()
    assert result.object_position_ok[position, 0].float().mean() <= 0.02
    assert result.position_ok[position].float().mean() <= 0.02
    # another shape: most fail (clean renders: all)
    assert result.object_shape_ok[shape, 0].float().mean() <= 0.1
    assert result.shape_ok[shape].float().mean() <= 0.1
    # pure background: nothing at all
    for name in ("colour", "position", "shape", "size"):
        assert not getattr(result, f"object_{name}_ok")[empty].any()
        assert not getattr(result, f"{name}_ok")[empty].any()


def test_checker_objects_sharing_a_colour(checker):
    left = SceneObject("circle", "red", "large", "left")
    right = SceneObject("square", "red", "small", "right")
    top = SceneObject("cross", "blue", "large", "top")
    drawn = Scene((left, right, top), "stripes", "beige")
    image = render_layout(layout_from_scenes([drawn], seed=3), 64)
    swapped = Scene((right, left, top), "stripes", "beige")  # caption order does not matter
    moved = Scene(
        (left, dataclasses.replace(right, position="bottom"), top), "stripes", "beige"
    )
    missing = Scene(
        (left, right, SceneObject("ring", "red", "small", "bottom")), "stripes", "beige"
    )
    result = checker(image.expand(4, -1, -1, -1), [drawn, swapped, moved, missing])
    assert result.all_ok[:2].all()
    assert result.object_position_ok[2].tolist() == [True, False, True]
    assert result.object_colour_ok[2].all() and not result.position_ok[2]
    # two red regions for three red objects: the two that match get them, the third fails
    assert result.object_colour_ok[3].tolist() == [True, True, False]
    assert result.object_position_ok[3].tolist() == [True, True, False]
    records = result.records()
    assert records[0]["all_ok"] and records[2]["objects"][1]["position"] == "right"


def test_checker_handles_single_images_dicts_and_high_resolution(checker):
    images, _, scenes = render_scenes(24, seed=14, resolution=256, split="heldout")
    result = checker(images, scenes)  # downsampled to the checker's 64 px
    assert result.all_ok.float().mean() >= 0.95, result.accuracy()
    single = checker(images[0], scenes[0].as_dict())
    assert len(single) == 1 and bool(single.all_ok[0]) == bool(result.all_ok[0])
    with pytest.raises(NulltextError, match="scenes"):
        checker(images[:2], scenes[:3])
