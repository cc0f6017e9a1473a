"""Tests for nulltext.data: image preprocessing, datasets, collate, datamodule and configs."""

from __future__ import annotations

import functools
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nulltext.data import (
    SAMPLE_IDS,
    CocoDataset,
    FolderDataset,
    InversionDataModule,
    SampleImages,
    collate_items,
    load_image,
    normalize_crop,
    preprocess_image,
    to_rgb,
)
from nulltext.errors import ImageError, NulltextError, UnknownNameError

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def rgb_at(t: torch.Tensor, y: int, x: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in t[:, y, x])


def assert_constant(t: torch.Tensor, rgb: tuple[int, int, int], res: int, tol: int = 0) -> None:
    assert t.dtype == torch.uint8 and tuple(t.shape) == (3, res, res)
    expected = torch.tensor(rgb, dtype=torch.int16).view(3, 1, 1)
    assert int((t.to(torch.int16) - expected).abs().max()) <= tol, t[:, 0, 0]


def assert_one_line(message: str, *phrases: str) -> None:
    assert "\n" not in message and "\r" not in message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


# ------------------------------------------------------------------------------------------
# Modes -> RGB uint8
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "suffix", "expected"),
    [
        (lambda: Image.new("L", (12, 8), 100), ".png", (100, 100, 100)),
        (lambda: Image.new("LA", (12, 8), (100, 255)), ".png", (100, 100, 100)),
        (lambda: Image.new("LA", (12, 8), (100, 0)), ".png", (255, 255, 255)),
        (lambda: Image.new("RGBA", (12, 8), (10, 20, 30, 0)), ".png", (255, 255, 255)),
        (lambda: Image.new("RGBA", (12, 8), (10, 20, 30, 255)), ".png", (10, 20, 30)),
        (lambda: Image.new("CMYK", (12, 8), (255, 0, 0, 0)), ".tif", (0, 255, 255)),
        (lambda: Image.new("CMYK", (12, 8), (0, 0, 0, 255)), ".tif", (0, 0, 0)),
        (lambda: Image.new("I;16", (12, 8), 65535), ".png", (255, 255, 255)),
        (lambda: Image.new("I;16", (12, 8), 25700), ".png", (100, 100, 100)),  # 25700/257
        (lambda: Image.new("I;16B", (12, 8), 51400), ".tif", (200, 200, 200)),
        (lambda: Image.new("I", (12, 8), 65535), ".tif", (255, 255, 255)),
        (lambda: Image.new("1", (12, 8), 1), ".png", (255, 255, 255)),
        (lambda: Image.new("1", (12, 8), 0), ".png", (0, 0, 0)),
        (lambda: Image.new("F", (12, 8), 0.5), ".tif", (128, 128, 128)),  # [0,1] data
        (lambda: Image.new("F", (12, 8), 200.0), ".tif", (200, 200, 200)),  # [0,255] data
        (lambda: Image.new("F", (12, 8), 300.0), ".tif", (255, 255, 255)),  # clipped
    ],
    ids=lambda v: None if callable(v) else str(v),
)
def test_mode_file_to_rgb(tmp_path, make, suffix, expected):
    image = make()
    path = tmp_path / f"img{suffix}"
    image.save(path)
    assert Image.open(path).mode == image.mode  # the file really has this mode
    assert_constant(load_image(path, 8), expected, 8)


def test_16bit_scaled_not_clipped():
    # PIL's own I;16 -> L conversion clips (300 -> 255); ours scales (300 -> 1).
    out = preprocess_image(Image.new("I;16", (4, 4), 300), 4)
    assert_constant(out, (1, 1, 1), 4)
    assert_constant(preprocess_image(Image.new("I", (4, 4), 2**31 - 1), 4), (255,) * 3, 4)
    assert_constant(preprocess_image(Image.new("I", (4, 4), -5), 4), (0,) * 3, 4)


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.paste(1, (4, 0, 8, 8))  # right half: palette index 1
    plain = tmp_path / "p.png"
    pal.save(plain)
    out = load_image(plain, 8)
    assert rgb_at(out, 0, 0) == (10, 20, 30) and rgb_at(out, 7, 7) == (200, 100, 50)

    transparent = tmp_path / "pt.png"
    pal.save(transparent, transparency=0)  # index 0 transparent -> white
    reopened = Image.open(transparent)
    assert reopened.mode == "P" and reopened.info.get("transparency") == 0
    out = load_image(transparent, 8)
    assert rgb_at(out, 0, 0) == (255, 255, 255) and rgb_at(out, 7, 7) == (200, 100, 50)


def test_half_transparent_blends_onto_white():
    out = to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))
    assert out.mode == "RGB"
    value = out.getpixel((0, 0))
    assert all(abs(v - 127) <= 1 for v in value)  # 255 * (1 - 128/255)


def test_nan_float_and_other_modes():
    arr = np.full((4, 4), np.nan, dtype=np.float32)
    assert_constant(preprocess_image(Image.fromarray(arr, mode="F"), 4), (0, 0, 0), 4)
    for mode, color in [("YCbCr", (128, 128, 128)), ("RGBX", (1, 2, 3, 0)), ("La", (9, 255))]:
        out = preprocess_image(Image.new(mode, (4, 4), color), 4)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 4, 4)


def test_multiframe_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    assert_constant(load_image(path, 8), (255, 0, 0), 8, tol=2)


# ------------------------------------------------------------------------------------------
# Crop offsets, centre crop, resize
# ------------------------------------------------------------------------------------------


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def test_crop_then_centre_crop_then_resize_matches_pil(tmp_path):
    image = _noise_image(40, 30)
    path = tmp_path / "noise.png"
    image.save(path)
    out = load_image(path, 16, crop=(3, 4, 2, 4))
    # Independently: remove offsets -> 33x24, centre crop offset (33-24)//2 = 4, bicubic resize.
    ref = image.crop((3, 2, 36, 26)).crop((4, 0, 28, 24)).resize((16, 16), Image.Resampling.BICUBIC)
    assert torch.equal(out, torch.from_numpy(np.array(ref)).permute(2, 0, 1))


def test_tall_image_centre_crop_matches_pil():
    image = _noise_image(20, 35, seed=1)
    out = preprocess_image(image, 12)
    ref = image.crop((0, 7, 20, 27)).resize((12, 12), Image.Resampling.BICUBIC)  # (35-20)//2 = 7
    assert torch.equal(out, torch.from_numpy(np.array(ref)).permute(2, 0, 1))


def test_coloured_region_lands_where_expected():
    image = Image.new("RGB", (40, 30), "white")
    image.paste((255, 0, 0), (10, 5, 20, 15))  # x 10..19, y 5..14
    out = preprocess_image(image, 24, crop={"left": 3, "right": 5, "top": 2, "bottom": 4})
    # after offsets: x 7..16, y 3..12 in a 32x24 image; centre crop removes 4 columns: x 3..12
    red = (out[0] == 255) & (out[1] == 0) & (out[2] == 0)
    expected = torch.zeros(24, 24, dtype=torch.bool)
    expected[3:13, 3:13] = True
    assert torch.equal(red, expected)
    assert bool((out[:, ~expected] == 255).all())


def test_crop_offsets_are_clamped_never_empty():
    image = Image.new("RGB", (10, 8), "black")
    image.putpixel((9, 7), (1, 2, 3))  # the only pixel left after an over-large crop
    assert_constant(preprocess_image(image, 4, crop=(1000, 1000, 1000, 1000)), (1, 2, 3), 4)


def test_normalize_crop_validation():
    assert normalize_crop(None) is None
    assert normalize_crop([1, 2, 3, 4]) == (1, 2, 3, 4)
    assert normalize_crop({"top": 5}) == (0, 0, 5, 0)
    for bad in ([1, 2, 3], [-1, 0, 0, 0], {"up": 1}, "1,2,3,4", [1.5, 0, 0, 0]):
        with pytest.raises(NulltextError) as info:
            normalize_crop(bad)
        assert_one_line(str(info.value), "crop")


# ------------------------------------------------------------------------------------------
# Bad inputs: one clear line each
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError) as info:
        load_image(path, 8)
    assert_one_line(str(info.value), f"image not found: {path}", "check data.dataset.path")


def test_corrupt_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.jpg"
    _noise_image(64, 64).save(truncated, quality=90)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is\nnot an image\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (garbage, truncated, text, empty):
        with pytest.raises(ImageError) as info:
            load_image(path, 8)
        assert_one_line(str(info.value), f"cannot read image {path}: ", "; re-export it as PNG or JPEG")
    with pytest.raises(ImageError) as info:
        load_image(empty, 8)
    assert "empty (0 bytes)" in str(info.value)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path, 8)  # a folder
    assert_one_line(str(info.value), "cannot read image")


def test_zero_size_image():
    with pytest.raises(ImageError) as info:
        preprocess_image(Image.new("RGB", (0, 5)), 8, source="x.png")
    assert_one_line(str(info.value), "image x.png has zero size (0x5 pixels)")


# ------------------------------------------------------------------------------------------
# FolderDataset and captions files
# ------------------------------------------------------------------------------------------


def _write_images(folder: Path, specs: dict[str, tuple[int, int, int]]) -> None:
    for name, color in specs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 6), color).save(folder / name)


def test_captions_csv_and_jsonl_parse_the_same(tmp_path):
    _write_images(tmp_path, {"a.png": (255, 0, 0), "sub/b.png": (0, 255, 0)})
    (tmp_path / "captions.csv").write_text(
        '\ufeffImage, Caption ,source\na.png,"a red square, bright",x\n\nsub/b.png,  a green one ,y\n',
        encoding="utf-8",
    )
    with (tmp_path / "caps.jsonl").open("w") as f:
        f.write(json.dumps({"image": "a.png", "caption": "a red square, bright"}) + "\n\n")
        f.write(json.dumps({"image": str(tmp_path / "sub/b.png"), "caption": "a green one"}) + "\n")
    csv_ds = FolderDataset(tmp_path, resolution=8)
    jsonl_ds = FolderDataset(tmp_path, "caps.jsonl", resolution=8)
    for ds in (csv_ds, jsonl_ds):
        assert ds.ids == ["a", "b"] and len(ds) == 2
        items = [ds[0], ds[1]]
        assert [i["caption"] for i in items] == ["a red square, bright", "a green one"]
        assert_constant(items[0]["image"], (255, 0, 0), 8)
        assert_constant(items[1]["image"], (0, 255, 0), 8)
    assert FolderDataset(tmp_path, resolution=8, limit=1).ids == ["a"]


def test_folder_bad_image_among_good_ones(tmp_path):
    _write_images(tmp_path, {"a.png": (255, 0, 0), "c.png": (0, 0, 255)})
    (tmp_path / "b.png").write_bytes(b"not a png at all")
    (tmp_path / "captions.csv").write_text(
        "image,caption\na.png,red\nb.png,broken\nmissing.png,gone\nc.png,blue\n"
    )
    ds = FolderDataset(tmp_path, resolution=8)
    items = [ds[i] for i in range(len(ds))]
    assert [i["id"] for i in items] == ["a", "b", "missing", "c"]
    assert "image" in items[0] and "image" in items[3]
    assert set(items[1]) == {"id", "error"}
    assert_one_line(items[1]["error"], "cannot read image", "b.png", "re-export it as PNG or JPEG")
    assert_one_line(items[2]["error"], "image not found:", "missing.png")
    assert_constant(items[3]["image"], (0, 0, 255), 8)


def test_empty_caption_is_a_failure_record(tmp_path):
    _write_images(tmp_path, {"a.png": (1, 1, 1), "b.png": (2, 2, 2)})
    (tmp_path / "captions.csv").write_text('image,caption\na.png,"   "\nb.png,fine\n')
    ds = FolderDataset(tmp_path, resolution=8)
    bad, good = ds[0], ds[1]
    assert set(bad) == {"id", "error"} and good["caption"] == "fine"
    expected = (
        "empty caption for image a: null-text inversion needs the image's caption; "
        f"add one to {tmp_path / 'captions.csv'}"
    )
    assert bad["error"] == expected
    with (tmp_path / "c.jsonl").open("w") as f:
        f.write(json.dumps({"image": "a.png", "caption": None}) + "\n")
    assert "empty caption for image a" in FolderDataset(tmp_path, "c.jsonl", resolution=8)[0]["error"]


@pytest.mark.parametrize(
    ("name", "content", "phrases"),
    [
        ("c.csv", "file,text\na.png,x\n", ["line 1", "'image' and 'caption'"]),
        ("c.csv", "image,caption\na.png,x\na.png,y,z\n", ["line 3", "3 fields"]),
        ("c.csv", "image,caption\na.png\n", ["line 2", "1 field"]),
        ("c.csv", "image,caption\n,x\n", ["line 2", "image field is empty"]),
        ("c.csv", "", ["is empty"]),
        ("c.csv", "image,caption,left\na.png,x,lots\n", ["line 2", "crop left"]),
        ("c.jsonl", '{"image": "a.png", "caption": "x"}\n{"image": "a.png", \n', ["line 2", "invalid JSON"]),
        ("c.jsonl", '\n["a.png", "x"]\n', ["line 2", "expected an object"]),
        ("c.jsonl", '{"image": "a.png"}\n', ["line 1", "missing key(s) caption"]),
        ("c.jsonl", '{"image": "a.png", "caption": 3}\n', ["line 1", "'caption' must be a string"]),
    ],
)
def test_malformed_captions_file_names_file_and_line(tmp_path, name, content, phrases):
    (tmp_path / name).write_text(content)
    with pytest.raises(NulltextError) as info:
        FolderDataset(tmp_path, name, resolution=8)
    assert_one_line(str(info.value), str(tmp_path / name), *phrases)


def test_missing_folder_captions_and_unknown_format(tmp_path):
    with pytest.raises(ImageError) as info:
        FolderDataset(tmp_path / "nope", resolution=8)
    assert_one_line(str(info.value), "data folder not found", "data.dataset.path=")
    with pytest.raises(NulltextError) as info:
        FolderDataset(tmp_path, resolution=8)
    assert_one_line(
        str(info.value), "captions file not found", "captions.csv nor captions.jsonl", "image,caption",
        "data.dataset.captions=",
    )
    with pytest.raises(NulltextError) as info:
        FolderDataset(tmp_path, "mine.csv", resolution=8)
    assert_one_line(str(info.value), f"captions file not found: {tmp_path / 'mine.csv'}")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(NulltextError) as info:
        FolderDataset(tmp_path, "c.txt", resolution=8)
    assert_one_line(str(info.value), "unsupported captions file type '.txt'", ".jsonl")


def test_captions_file_found_by_itself(tmp_path):
    _write_images(tmp_path, {"a.png": (255, 0, 0)})
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(json.dumps({"image": "a.png", "caption": "from jsonl"}) + "\n")
    ds = FolderDataset(tmp_path, resolution=8)
    assert ds.captions_file == jsonl and ds[0]["caption"] == "from jsonl"

    csv_file = tmp_path / "captions.csv"
    csv_file.write_text("image,caption\na.png,from csv\n")
    with pytest.raises(NulltextError) as info:
        FolderDataset(tmp_path, resolution=8)
    assert_one_line(str(info.value), f"both {csv_file} and {jsonl} exist", "data.dataset.captions=")
    # Naming one settles it.
    assert FolderDataset(tmp_path, "captions.csv", resolution=8)[0]["caption"] == "from csv"

    jsonl.unlink()
    ds = FolderDataset(tmp_path, resolution=8)
    assert ds.captions_file == csv_file and ds[0]["caption"] == "from csv"


def test_duplicate_stems_and_per_row_crop(tmp_path):
    _write_images(tmp_path, {"x/cat.png": (1, 1, 1), "y/cat.png": (2, 2, 2), "cat.jpg": (3, 3, 3)})
    strip = Image.new("RGB", (20, 10), "white")
    strip.paste((0, 0, 255), (0, 0, 10, 10))
    strip.save(tmp_path / "strip.png")
    (tmp_path / "captions.csv").write_text(
        "image,caption,left,right,top,bottom\n"
        "x/cat.png,one,,,,\ny/cat.png,two,,,,\ncat.jpg,three,,,,\ncat.jpg,again,,,,\n"
        "strip.png,blue half,,10,,\n"
    )
    ds = FolderDataset(tmp_path, resolution=8, crop=(0, 0, 0, 0))
    assert ds.ids == ["cat_x_cat.png", "cat_y_cat.png", "cat_cat.jpg", "cat_cat.jpg_2", "strip"]
    assert len(set(ds.ids)) == len(ds.ids)
    assert_constant(ds[4]["image"], (0, 0, 255), 8)  # right 10 columns removed -> all blue
    # rows without crop values use the dataset-level crop; without any crop: a white/blue mix
    (tmp_path / "plain.csv").write_text("image,caption\nstrip.png,half\n")
    assert_constant(FolderDataset(tmp_path, "plain.csv", resolution=8, crop=(10, 0, 0, 0))[0]["image"], (255, 255, 255), 8)
    mixed = FolderDataset(tmp_path, "plain.csv", resolution=8)[0]["image"]
    assert rgb_at(mixed, 4, 0) == (0, 0, 255) and rgb_at(mixed, 4, 7) == (255, 255, 255)


# ------------------------------------------------------------------------------------------
# SampleImages
# ------------------------------------------------------------------------------------------


def _check_samples(resolution: int) -> SampleImages:
    ds = SampleImages(resolution)
    assert len(ds) == len(SAMPLE_IDS) >= 7
    assert ds.ids == list(SAMPLE_IDS) and len(set(ds.ids)) == len(ds.ids)
    for i in range(len(ds)):
        item = ds[i]
        assert "error" not in item, item.get("error")
        assert item["image"].dtype == torch.uint8
        assert tuple(item["image"].shape) == (3, resolution, resolution)
        assert item["caption"].strip() and "\n" not in item["caption"]
        assert float(item["image"].float().std()) > 5  # a real photo, not a blank
    return ds


def test_sample_images_load_at_64():
    imported_before = "skimage" in sys.modules or "sklearn" in sys.modules
    ds = _check_samples(64)
    assert ds.ids[:3] == ["astronaut", "cat", "coffee"]
    assert "orange spacesuit" in ds[0]["caption"]
    if not imported_before:  # files are located without importing the packages
        assert "skimage" not in sys.modules and "sklearn" not in sys.modules


@pytest.mark.slow
def test_sample_images_load_at_512():
    _check_samples(512)


def test_sample_images_names_and_limit():
    ds = SampleImages(16, names=["coffee", "astronaut"])
    assert ds.ids == ["coffee", "astronaut"]
    assert SampleImages(16, limit=2).ids == list(SAMPLE_IDS[:2])
    assert SampleImages(16, names=["cat", "rocket", "pagoda"], limit=2).ids == ["cat", "rocket"]
    with pytest.raises(UnknownNameError) as info:
        SampleImages(16, names=["astronaut", "dog"])
    assert_one_line(str(info.value), "dog", *SAMPLE_IDS)
    with pytest.raises(NulltextError):
        SampleImages(0)


# ------------------------------------------------------------------------------------------
# COCO (a tiny fake COCO folder)
# ------------------------------------------------------------------------------------------


def _fake_coco(root: Path, n_images: int = 8) -> Path:
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    ann_id = 100
    for k in range(n_images):
        image_id = 1000 + 7 * k
        name = f"{image_id:012d}.jpg"
        Image.new("RGB", (12 + k, 9), (20 * k, 10, 200)).save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 12 + k, "height": 9})
        for c in range(3):
            annotations.append({"id": ann_id, "image_id": image_id, "caption": f"photo {k} caption {c}"})
            ann_id += 1
    images.append({"id": 5, "file_name": "000000000005.jpg", "width": 1, "height": 1})  # no captions
    data = {"info": {}, "images": images, "annotations": annotations}
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    return root


def _pairs(ds: CocoDataset) -> list[tuple[str, str]]:
    return list(zip(ds.ids, ds.captions))


def test_coco_selection_is_seeded_and_documented(tmp_path):
    root = _fake_coco(tmp_path / "coco")
    a = CocoDataset(root, num_images=3, seed=0, resolution=8)
    b = CocoDataset(root, num_images=3, seed=0, resolution=8)
    c = CocoDataset(root, num_images=3, seed=1, resolution=8)
    assert _pairs(a) == _pairs(b)
    assert _pairs(a) != _pairs(c)
    assert len(a) == 3 and len(set(a.ids)) == 3
    # The documented protocol, reimplemented.
    rng = random.Random(0)
    chosen = rng.sample(sorted(1000 + 7 * k for k in range(8)), 3)
    expected = [(f"{i:012d}", f"photo {(i - 1000) // 7} caption {rng.choice(range(3))}") for i in chosen]
    assert _pairs(a) == expected
    assert a.image_ids == chosen
    assert CocoDataset(root, num_images=3, seed=0, resolution=8, limit=2).ids == a.ids[:2]
    item = a[0]
    assert item["caption"] == expected[0][1] and tuple(item["image"].shape) == (3, 8, 8)
    assert len(CocoDataset(root, num_images=8, seed=5, resolution=8)) == 8


def test_coco_errors(tmp_path):
    with pytest.raises(NulltextError) as info:
        CocoDataset(tmp_path / "absent", resolution=8)
    assert_one_line(str(info.value), "COCO is not bundled", "cocodataset.org", "data.dataset.root=")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NulltextError) as info:
        CocoDataset(tmp_path / "empty", resolution=8)
    assert_one_line(str(info.value), "captions_val2017.json", "COCO is not bundled")
    root = _fake_coco(tmp_path / "coco")
    with pytest.raises(NulltextError) as info:
        CocoDataset(root, num_images=100, resolution=8)
    assert_one_line(str(info.value), "num_images=100", "only 8 images")
    (root / "val2017" / "000000001000.jpg").unlink()
    ds = CocoDataset(root, num_images=8, seed=0, resolution=8)
    errors = [ds[i] for i in range(len(ds)) if "error" in ds[i]]
    assert [e["id"] for e in errors] == ["000000001000"]
    assert_one_line(errors[0]["error"], "image not found", "data.dataset.root")
    (root / "annotations" / "captions_val2017.json").write_text('{"images": [\n{oops')
    with pytest.raises(NulltextError) as info:
        CocoDataset(root, resolution=8)
    assert_one_line(str(info.value), "invalid JSON", "line 2")


# ------------------------------------------------------------------------------------------
# Collate, DataModule, configs
# ------------------------------------------------------------------------------------------


def _three_with_one_bad(folder: Path) -> Path:
    _write_images(folder, {"a.png": (255, 0, 0), "c.png": (0, 0, 255)})
    (folder / "captions.csv").write_text("image,caption\na.png,red\nb.png,gone\nc.png,blue\n")
    return folder


def test_collate_and_datamodule_batch_of_three(tmp_path):
    folder = _three_with_one_bad(tmp_path)
    dm = InversionDataModule(functools.partial(FolderDataset, path=folder), batch_size=3, resolution=16)
    assert dm.ids == ["a", "b", "c"] and dm.resolution == 16
    assert dm.captions == ["red", "gone", "blue"]
    batches = list(dm.test_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch["ids"] == ["a", "c"] and batch["captions"] == ["red", "blue"]
    assert batch["images"].dtype == torch.uint8 and tuple(batch["images"].shape) == (2, 3, 16, 16)
    assert_constant(batch["images"][1], (0, 0, 255), 16)
    assert [f["id"] for f in batch["failures"]] == ["b"]
    assert "image not found" in batch["failures"][0]["error"]
    assert [b["ids"] for b in InversionDataModule(
        functools.partial(FolderDataset, path=folder), resolution=16
    ).predict_dataloader()] == [["a"], [], ["c"]]

    empty = collate_items([{"id": "x", "error": "bad"}])
    assert empty["ids"] == [] and empty["images"].dtype == torch.uint8
    assert empty["images"].shape[0] == 0 and empty["failures"] == [{"id": "x", "error": "bad"}]


def test_datamodule_resolution_and_instances(tmp_path):
    folder = _three_with_one_bad(tmp_path)
    with pytest.raises(NulltextError) as info:
        InversionDataModule(functools.partial(FolderDataset, path=folder))
    assert_one_line(str(info.value), "resolution is null", "instantiate(cfg.data, resolution=512)")
    bound = InversionDataModule(functools.partial(FolderDataset, path=folder, resolution=8), limit=2)
    assert bound.resolution == 8 and bound.ids == ["a", "b"]
    ds = FolderDataset(folder, resolution=8)
    dm = InversionDataModule(ds, batch_size=2, limit=2)
    assert dm.ids == ["a", "b"] and [len(b["failures"]) for b in dm.test_dataloader()] == [1]
    assert dm.captions == ["red", "gone"]
    with pytest.raises(NulltextError):
        InversionDataModule(ds, resolution=16)
    with pytest.raises(NulltextError):
        InversionDataModule(functools.partial(FolderDataset, path=folder), resolution=8, batch_size=0)


def test_datamodule_with_trainer_test(tmp_path):
    import lightning as L

    seen = []

    class Probe(L.LightningModule):
        def test_step(self, batch, batch_idx):
            seen.append((batch["ids"], tuple(batch["images"].shape), [f["id"] for f in batch["failures"]]))

    folder = _three_with_one_bad(tmp_path)
    dm = InversionDataModule(functools.partial(FolderDataset, path=folder), batch_size=3, resolution=8)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.test(Probe(), datamodule=dm, verbose=False)
    assert seen == [(["a", "c"], (2, 3, 8, 8), ["b"])]


def _config(name: str, **dataset_overrides):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 3, "data": OmegaConf.load(CONF / f"{name}.yaml")})
    for key, value in dataset_overrides.items():
        cfg.data.dataset[key] = value
    return cfg


def test_configs_instantiate(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    for name in ("samples", "folder", "coco"):
        raw = OmegaConf.load(CONF / f"{name}.yaml")
        assert raw._target_ == "nulltext.data.InversionDataModule"
        assert raw.batch_size == 1 and raw.limit is None and raw.resolution is None
        assert raw.dataset._partial_ is True

    cfg = _config("samples")
    cfg.data.limit = 2
    dm = instantiate(cfg.data, resolution=16)
    assert isinstance(dm.dataset, SampleImages) and dm.ids == list(SAMPLE_IDS[:2])
    assert dm.dataset.resolution == 16

    with pytest.raises(MissingMandatoryValue):
        OmegaConf.to_container(_config("folder").data, resolve=True, throw_on_missing=True)
    folder = _three_with_one_bad(tmp_path / "f")
    dm = instantiate(_config("folder", path=str(folder)).data, resolution=8)
    assert isinstance(dm.dataset, FolderDataset) and dm.ids == ["a", "b", "c"]
    assert dm.dataset.captions_file == folder / "captions.csv"  # found, not named by the config
    cfg = _config("folder", path=str(folder), crop=[0, 0, 1, 0])
    assert instantiate(cfg.data, resolution=8).dataset._entries[0].crop == (0, 0, 1, 0)

    root = _fake_coco(tmp_path / "coco")
    cfg = _config("coco", root=str(root), num_images=4)
    assert cfg.data.dataset.num_images == 4 and _config("coco").data.dataset.num_images == 100
    dm = instantiate(cfg.data, resolution=8)
    assert isinstance(dm.dataset, CocoDataset) and dm.dataset.seed == 3  # ${seed}
    assert _pairs(dm.dataset) == _pairs(CocoDataset(root, num_images=4, seed=3, resolution=8))
