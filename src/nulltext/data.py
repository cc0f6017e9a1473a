"""Input data for null-text inversion: real photos with their captions.

Everything here yields *records*, one per image:

* a good item: ``{"id": str, "image": torch.uint8 tensor [3, R, R], "caption": str}``
* a bad item: ``{"id": str, "error": "<one line saying what went wrong and what to do>"}``

so one unreadable image never stops a run over the others (datasets do not raise for a bad
item; they raise :class:`~nulltext.errors.NulltextError` only for problems that concern the
whole dataset, such as a missing folder or a malformed captions file).

Image preprocessing follows the official null-text code (``load_512``), with its bugs fixed:

1. convert any PIL mode to 8-bit RGB (see :func:`to_rgb`);
2. remove optional pixel crop offsets ``(left, right, top, bottom)``, clamped so at least one
   pixel always remains (the official code clamped ``top`` against ``left``; fixed here);
3. centre-crop to a square on the short side (offset ``(long - short) // 2``);
4. PIL-resize to ``resolution`` x ``resolution`` with bicubic filtering.

Datasets: :class:`SampleImages` (photos shipped inside installed wheels, no download),
:class:`FolderDataset` (a folder plus ``captions.csv`` / ``.jsonl``) and :class:`CocoDataset`
(the paper's protocol: N random COCO val2017 image/caption pairs chosen by seed).
:class:`InversionDataModule` wraps any of them for ``trainer.test`` / ``trainer.predict``.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import numbers
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Subset

from nulltext.errors import CaptionError, ImageError, NulltextError, UnknownNameError
from nulltext.validation import SettingError, check_bool, check_int, check_seed

__all__ = [
    "Crop",
    "normalize_crop",
    "to_rgb",
    "preprocess_image",
    "load_image",
    "SampleImages",
    "SAMPLE_IDS",
    "FolderDataset",
    "CAPTIONS_FILES",
    "CocoDataset",
    "collate_items",
    "InversionDataModule",
]

Crop = tuple[int, int, int, int]
"""Pixel offsets ``(left, right, top, bottom)`` removed from the image borders."""

_CROP_KEYS = ("left", "right", "top", "bottom")

# The override keys users pass on the command line; quoted in error messages.
FOLDER_HINT = "check data.dataset.path / the captions file"
COCO_HINT = "check data.dataset.root / data.dataset.images"

_REEXPORT = "re-export it as PNG or JPEG"


def _one_line(text: str) -> str:
    """Collapse all whitespace (newlines included) so a message is always a single line."""
    return re.sub(r"\s+", " ", str(text)).strip()


# --------------------------------------------------------------------------------------------
# Image preprocessing
# --------------------------------------------------------------------------------------------


def normalize_crop(crop: Crop | Sequence[int] | Mapping[str, int] | None) -> Crop | None:
    """Validate crop offsets: ``None``, 4 non-negative ints ``(left, right, top, bottom)``, or a
    mapping with (a subset of) those keys, missing keys meaning 0. Raises :class:`NulltextError`."""
    if crop is None:
        return None
    if isinstance(crop, Mapping):
        unknown = sorted(set(map(str, crop)) - set(_CROP_KEYS))
        if unknown:
            raise NulltextError(
                f"unknown crop key(s) {unknown}: use left, right, top, bottom (pixel offsets)"
            )
        values = [crop.get(k, 0) for k in _CROP_KEYS]
    elif isinstance(crop, Iterable) and not isinstance(crop, (str, bytes)):
        values = list(crop)
        if len(values) != 4:
            raise NulltextError(
                f"crop must have 4 values (left, right, top, bottom), got {len(values)}: {values}"
            )
    else:
        raise NulltextError(
            f"crop must be 4 pixel offsets (left, right, top, bottom) or null, got {crop!r}"
        )
    out = []
    for key, value in zip(_CROP_KEYS, values):
        if not _is_int(value):
            raise NulltextError(f"crop {key} must be an integer number of pixels, got {value!r}")
        if value < 0:
            raise NulltextError(f"crop {key} must be >= 0 pixels, got {value}")
        out.append(int(value))
    return (out[0], out[1], out[2], out[3])


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """Flatten an RGBA image onto an opaque white background (fully transparent -> white)."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _gray_array_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit ``RGB``.

    * ``RGB``: unchanged. ``L``, ``1`` (bilevel: 0/255), ``CMYK``, ``YCbCr``, ``HSV``, ``RGBX``
      and other plain modes: PIL's own conversion (CMYK uses PIL's naive formula, no ICC
      profile: pure cyan becomes (0, 255, 255)).
    * Transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, ``P`` with a transparent palette
      entry, or ``L``/``RGB``/``1`` with a ``transparency`` colour): composited onto a **white**
      background, so fully transparent pixels become (255, 255, 255).
    * Integer greyscale ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N``: scaled, not clipped,
      ``v * 255 / 65535`` rounded (65535 -> 255, 32768 -> 128).
    * ``I`` (32-bit signed integer): negative values become 0; if every value fits 16 bits
      (the usual case, 16-bit PNG/TIFF data) it is scaled like ``I;16``, otherwise by
      ``v * 255 / (2**31 - 1)``.
    * ``F`` (32-bit float): if the largest finite value is <= 1 the data is taken as [0, 1]
      and multiplied by 255; otherwise it is taken as already [0, 255]. Values are then clipped
      to [0, 255] and rounded; NaN becomes 0.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64)
        return _gray_array_to_rgb(np.round(values / 257.0))
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        values = np.clip(values, 0, None)
        scale = 257.0 if values.size == 0 or values.max() <= 65535 else (2**31 - 1) / 255.0
        return _gray_array_to_rgb(np.clip(np.round(values / scale), 0, 255))
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.max() <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0)  # +/-inf are clipped below
        return _gray_array_to_rgb(np.round(np.clip(values, 0, 255)))
    if mode in ("RGBA", "PA", "RGBa"):
        return _composite_on_white(image.convert("RGBA"))
    if mode in ("LA", "La"):
        la = image.convert("LA") if mode == "La" else image  # PIL: La -> RGBA is unsupported
        return _composite_on_white(la.convert("RGBA"))
    if mode in ("P", "L", "1", "RGB") and "transparency" in image.info:
        return _composite_on_white(image.convert("RGBA"))
    return image.convert("RGB")


def preprocess_image(
    image: Image.Image,
    resolution: int,
    crop: Crop | Sequence[int] | Mapping[str, int] | None = None,
    *,
    source: str = "<image>",
) -> torch.Tensor:
    """Convert, crop and resize one PIL image; returns ``torch.uint8`` ``[3, R, R]``.

    Steps (fixed official null-text ``load_512``): :func:`to_rgb`; remove ``crop`` offsets
    ``(left, right, top, bottom)`` clamped so at least one pixel row/column remains; centre
    crop to a square on the short side; bicubic PIL resize. ``source`` names the image in
    error messages. Raises :class:`ImageError` for a zero-size image.
    """
    resolution = check_resolution(resolution)
    offsets = normalize_crop(crop) or (0, 0, 0, 0)
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image {source} has zero size ({w}x{h} pixels): {_REEXPORT}")
    image = to_rgb(image)

    left, right, top, bottom = offsets
    left = min(left, w - 1)
    right = min(right, w - left - 1)
    top = min(top, h - 1)
    bottom = min(bottom, h - top - 1)
    if left or right or top or bottom:
        image = image.crop((left, top, w - right, h - bottom))
        w, h = image.size

    if w > h:
        offset = (w - h) // 2
        image = image.crop((offset, 0, offset + h, h))
    elif h > w:
        offset = (h - w) // 2
        image = image.crop((0, offset, w, offset + w))

    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.array(image, dtype=np.uint8)  # copy: [R, R, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(
    path: str | os.PathLike,
    resolution: int,
    crop: Crop | Sequence[int] | Mapping[str, int] | None = None,
    *,
    missing_hint: str = FOLDER_HINT,
    exif_transpose: bool = False,
) -> torch.Tensor:
    """Read an image file and :func:`preprocess_image` it; ``torch.uint8`` ``[3, R, R]``.

    Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF) use their first frame.
    ``exif_transpose`` applies the EXIF orientation tag first; it is off by default, as in the
    official code and COCO (whose annotations refer to the stored pixel orientation).

    Raises :class:`ImageError` with one line: ``image not found: <path>: <missing_hint>`` or
    ``cannot read image <path>: <reason>; re-export it as PNG or JPEG`` (corrupt, truncated,
    empty or not-an-image files) or a zero-size message.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(_one_line(f"image not found: {path}: {missing_hint}"))
    try:
        if path.is_dir():
            raise IsADirectoryError("it is a folder, not an image file")
        if path.stat().st_size == 0:
            raise OSError("the file is empty (0 bytes)")
        with Image.open(path) as opened:
            if getattr(opened, "n_frames", 1) > 1:
                opened.seek(0)
            opened.load()
            # copy() keeps .info (palette transparency etc.); the file is closed afterwards
            image = ImageOps.exif_transpose(opened) if exif_transpose else opened.copy()
    except ImageError:
        raise
    except Exception as exc:  # PIL raises many types for bad files (OSError, SyntaxError, ...)
        reason = str(exc) or type(exc).__name__
        raise ImageError(_one_line(f"cannot read image {path}: {reason}; {_REEXPORT}")) from exc
    return preprocess_image(image, resolution, crop, source=str(path))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_resolution(resolution: Any) -> int:
    """An image side in pixels, >= 1 (whether the model can take it is checked where the model is known)."""
    return check_int("data.resolution", resolution, 1)


def check_limit(limit: Any) -> int | None:
    """null (every item) or the number of first items to keep, >= 1."""
    return None if limit is None else check_int("data.limit", limit, 1)


def _setting_path(name: str, value: Any) -> Path:
    """A file or folder setting: a non-empty path (a number or a list is a mistyped value)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise SettingError(f"{name}={value!r} is not allowed: a file or folder path")
    return Path(value).expanduser()


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    id: str
    path: Path | None  # None: the image cannot be located; ``error`` says why
    caption: str
    crop: Crop | None = None
    error: str | None = None


class _CaptionedImages(Dataset):
    """Shared behaviour: a fixed, ordered list of (id, image path, caption) entries."""

    def __init__(
        self,
        entries: list[_Entry],
        resolution: int,
        limit: int | None,
        *,
        caption_source: str,
        missing_hint: str,
        exif_transpose: bool = False,
    ) -> None:
        self.resolution = check_resolution(resolution)
        limit = check_limit(limit)
        self._entries = entries if limit is None else entries[:limit]
        self._caption_source = caption_source
        self._missing_hint = missing_hint
        self._exif_transpose = exif_transpose

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self._entries]

    @property
    def captions(self) -> list[str]:
        """Captions aligned with :attr:`ids`, stripped as items return them ("" if empty)."""
        return [e.caption.strip() for e in self._entries]

    @property
    def paths(self) -> list[Path | None]:
        return [e.path for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self._entries[index]  # IndexError past the end, as Dataset iteration expects
        try:
            if entry.error is not None:
                raise ImageError(entry.error)
            caption = entry.caption.strip()
            if not caption:
                raise CaptionError(
                    f"empty caption for image {entry.id}: null-text inversion needs the image's "
                    f"caption; add one to {self._caption_source}"
                )
            image = load_image(
                entry.path,
                self.resolution,
                entry.crop,
                missing_hint=self._missing_hint,
                exif_transpose=self._exif_transpose,
            )
        except NulltextError as exc:
            return {"id": entry.id, "error": _one_line(str(exc))}
        return {"id": entry.id, "image": image, "caption": caption}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, resolution={self.resolution})"


# The sample captions below are hand-written by the nulltext project after looking at each
# photo (after the centre crop). They are in the style of COCO captions but are NOT COCO
# captions. The photos ship inside installed wheels, so they work offline.
_SAMPLES: tuple[tuple[str, str, str, str], ...] = (
    # (id, package, path inside the package, caption); most varied first: default runs use the
    # first few.
    (
        "astronaut",
        "skimage",
        "data/astronaut.png",
        "a smiling woman astronaut in an orange spacesuit next to an american flag and a "
        "space shuttle model",
    ),
    ("cat", "skimage", "data/chelsea.png", "a close up of a tabby cat with green eyes"),
    (
        "coffee",
        "skimage",
        "data/coffee.png",
        "a cup of espresso on a red saucer with a spoon on a wooden table",
    ),
    (
        "pagoda",
        "sklearn",
        "datasets/images/china.jpg",
        "a tall chinese pagoda with green and orange roofs above trees next to a lake",
    ),
    (
        "dahlia",
        "sklearn",
        "datasets/images/flower.jpg",
        "an orange dahlia flower in front of dark green leaves",
    ),
    (
        "rocket",
        "skimage",
        "data/rocket.jpg",
        "a white rocket on a launch pad between tall towers at dusk",
    ),
    (
        "motorcycle",
        "skimage",
        "data/motorcycle_left.png",
        "a red motorcycle parked in a garage in front of shelves with boxes",
    ),
    (
        "grace_hopper",
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        "an old woman with glasses in a navy uniform and cap in front of an american flag",
    ),
    (
        "cameraman",
        "skimage",
        "data/camera.png",
        "a black and white photo of a man in a dark coat looking through a camera on a tripod "
        "in a field",
    ),
)

SAMPLE_IDS: tuple[str, ...] = tuple(s[0] for s in _SAMPLES)
"""Ids of :class:`SampleImages`, in their default order (most varied first)."""

_PIP_NAMES = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (``None`` if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


class SampleImages(_CaptionedImages):
    """Real photos available offline inside installed wheels, with hand-written captions.

    Files: scikit-image ``skimage/data/`` (astronaut.png, chelsea.png, coffee.png, rocket.jpg,
    motorcycle_left.png, camera.png), scikit-learn ``sklearn/datasets/images/`` (china.jpg,
    flower.jpg) and matplotlib ``mpl-data/sample_data/grace_hopper.jpg``. Ids (in order, most
    varied first): see :data:`SAMPLE_IDS`.

    The captions are hand-written by the nulltext project in the style of COCO captions; they
    are **not** COCO captions.

    ``names`` selects a subset by id, in the order given (unknown id -> :class:`UnknownNameError`);
    ``limit`` then keeps the first N. A sample whose package is not installed becomes a failure
    record, not an exception.
    """

    def __init__(
        self,
        resolution: int,
        limit: int | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        by_id = {s[0]: s for s in _SAMPLES}
        if names is None:
            chosen = list(_SAMPLES)
        else:
            if isinstance(names, str):
                names = [names]
            if not isinstance(names, Sequence) or not names:
                raise SettingError(f"data.dataset.names={names!r} is not allowed: null (all) or a list of sample ids from {', '.join(SAMPLE_IDS)}")
            names = list(names)
            unknown = [n for n in names if n not in by_id]
            if unknown:
                raise UnknownNameError(
                    f"unknown sample image(s) {', '.join(map(str, unknown))}: "
                    f"valid ids are {', '.join(SAMPLE_IDS)}"
                )
            chosen = [by_id[n] for n in dict.fromkeys(names)]
        entries = []
        for sample_id, package, relpath, caption in chosen:
            root = _package_dir(package)
            pip_name = _PIP_NAMES[package]
            if root is None:
                entries.append(
                    _Entry(
                        sample_id,
                        None,
                        caption,
                        error=f"sample image {sample_id} needs {pip_name}, which is not "
                        f"installed: pip install {pip_name}",
                    )
                )
            else:
                entries.append(_Entry(sample_id, root / relpath, caption))
        super().__init__(
            entries,
            resolution,
            limit,
            caption_source="nulltext.data._SAMPLES",
            missing_hint="the installed package lacks its sample data; reinstall "
            "scikit-image / scikit-learn / matplotlib",
        )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _unique_ids(stems: list[str], relpaths: list[str]) -> list[str]:
    """Ids are file stems; stems shared by several rows get ``_<relative path>`` appended, and
    any remaining clash (the same file listed twice) gets ``_2``, ``_3``, ..."""
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    ids = [
        stem if counts[stem] == 1 else f"{stem}_{_safe(rel)}" for stem, rel in zip(stems, relpaths)
    ]
    seen: dict[str, int] = {}
    out = []
    for ident in ids:
        n = seen.get(ident, 0) + 1
        seen[ident] = n
        out.append(ident if n == 1 else f"{ident}_{n}")
    return out


def _parse_row_crop(values: Mapping[str, Any], where: str) -> Crop | None:
    """Per-image crop from optional left/right/top/bottom fields (empty/missing = 0)."""
    present = {k: values[k] for k in _CROP_KEYS if values.get(k) not in (None, "")}
    if not present:
        return None
    try:
        for key, value in present.items():
            if isinstance(value, str):
                try:
                    present[key] = int(value.strip())
                except ValueError:
                    raise NulltextError(
                        f"crop {key} must be an integer number of pixels, got {value!r}"
                    ) from None
        return normalize_crop(present)
    except NulltextError as exc:
        raise NulltextError(f"{where}: {exc}") from None


def _read_captions_csv(file: Path) -> list[tuple[int, str, str, Crop | None]]:
    rows = []
    with file.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = None
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue  # blank line
            line = reader.line_num
            if header is None:
                header = [f.strip().lower() for f in fields]
                missing = [c for c in ("image", "caption") if c not in header]
                if missing:
                    raise NulltextError(
                        f"captions file {file} line {line}: header must name the columns "
                        f"'image' and 'caption' (missing {', '.join(missing)}; found "
                        f"{', '.join(header)}); first line should be: image,caption"
                    )
                continue
            if len(fields) < len(header):
                raise NulltextError(
                    f"captions file {file} line {line}: has {len(fields)} field(s), the header "
                    f"has {len(header)}; quote captions that contain commas"
                )
            if len(fields) > len(header):
                raise NulltextError(
                    f"captions file {file} line {line}: has {len(fields)} fields, the header has "
                    f"{len(header)}; quote captions that contain commas"
                )
            values = dict(zip(header, fields))
            image = values["image"].strip()
            if not image:
                raise NulltextError(f"captions file {file} line {line}: the image field is empty")
            crop = _parse_row_crop(values, f"captions file {file} line {line}")
            rows.append((line, image, values["caption"], crop))
        if header is None:
            raise NulltextError(
                f"captions file {file} is empty: write a header 'image,caption' then one row "
                "per image"
            )
    return rows


def _read_captions_jsonl(file: Path) -> list[tuple[int, str, str, Crop | None]]:
    rows = []
    with file.open(encoding="utf-8-sig") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            where = f"captions file {file} line {line}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise NulltextError(
                    f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be "
                    '{"image": "<file>", "caption": "<text>"}'
                ) from None
            if not isinstance(obj, dict):
                raise NulltextError(
                    f'{where}: expected an object like {{"image": "<file>", "caption": "<text>"}}, '
                    f"got {type(obj).__name__}"
                )
            missing = [k for k in ("image", "caption") if k not in obj]
            if missing:
                raise NulltextError(f"{where}: missing key(s) {', '.join(missing)}")
            image, caption = obj["image"], obj["caption"]
            if not isinstance(image, str) or not image.strip():
                raise NulltextError(f"{where}: 'image' must be a non-empty file name")
            if caption is None:
                caption = ""
            if not isinstance(caption, str):
                raise NulltextError(
                    f"{where}: 'caption' must be a string, got {type(caption).__name__}"
                )
            rows.append((line, image.strip(), caption, _parse_row_crop(obj, where)))
    return rows


_CAPTION_READERS: dict[str, Callable[[Path], list[tuple[int, str, str, Crop | None]]]] = {
    ".csv": _read_captions_csv,
    ".jsonl": _read_captions_jsonl,
    ".ndjson": _read_captions_jsonl,
}


CAPTIONS_FILES = ("captions.csv", "captions.jsonl")
"""The captions files :class:`FolderDataset` looks for when none is named."""


def _find_captions_file(folder: Path) -> Path:
    """The one of :data:`CAPTIONS_FILES` present in ``folder``; :class:`NulltextError` if both or
    neither are there."""
    found = [folder / name for name in CAPTIONS_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise NulltextError(
            f"both {found[0]} and {found[1]} exist: remove one or pass "
            f"data.dataset.captions=<file>"
        )
    if not found:
        raise NulltextError(
            f"captions file not found: {folder} has neither {' nor '.join(CAPTIONS_FILES)}: "
            "create one (CSV with header image,caption, or JSONL with one "
            '{"image": ..., "caption": ...} per line) or pass data.dataset.captions=<file>'
        )
    return found[0]


class FolderDataset(_CaptionedImages):
    """A folder of images plus a captions file.

    ``captions`` (relative to ``path`` unless absolute) is read according to its extension;
    ``None`` (the default) finds :data:`CAPTIONS_FILES` (``captions.csv`` or ``captions.jsonl``)
    in the folder, and raises if both or neither exist:

    * ``.csv``: a header row with (at least) the columns ``image,caption``;
    * ``.jsonl`` / ``.ndjson``: one object ``{"image": ..., "caption": ...}`` per line.

    Image paths resolve against ``path`` unless absolute. Optional per-image crop offsets may be
    given as extra columns / keys ``left, right, top, bottom`` (empty = 0); they override
    ``crop``, which applies to every other image. Rows keep the file's order; ``limit`` keeps
    the first N. Ids are image file stems; a stem shared by several rows gets ``_<relative
    path>`` appended.

    Raises :class:`NulltextError` (one line) for a missing folder or captions file and for a
    malformed captions file (naming the file and line). Bad images and empty captions become
    failure records instead.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        captions: str | os.PathLike | None = None,
        *,
        resolution: int,
        limit: int | None = None,
        crop: Crop | Sequence[int] | Mapping[str, int] | None = None,
        exif_transpose: bool = False,
    ) -> None:
        folder = _setting_path("data.dataset.path", path)
        exif_transpose = check_bool("data.dataset.exif_transpose", exif_transpose)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "not found"
            raise ImageError(
                f"data folder {what}: {folder}: pass data.dataset.path=<folder with the images "
                f"and {captions or ' or '.join(CAPTIONS_FILES)}>"
            )
        if captions is None:
            file = _find_captions_file(folder)  # already inside the folder
        else:
            file = _setting_path("data.dataset.captions", captions)
            file = file if file.is_absolute() else folder / file
        reader = _CAPTION_READERS.get(file.suffix.lower())
        if reader is None:
            raise NulltextError(
                f"unsupported captions file type {file.suffix or '(none)'!r} for {file}: use .csv "
                "(header image,caption) or .jsonl (one {\"image\": ..., \"caption\": ...} per line)"
            )
        if not file.is_file():
            raise NulltextError(
                f"captions file not found: {file}: create it (CSV with header image,caption, or "
                "JSONL) or pass data.dataset.captions=<file>"
            )
        default_crop = normalize_crop(crop)
        try:
            rows = reader(file)
        except UnicodeDecodeError:
            raise NulltextError(
                f"captions file {file} is not UTF-8 text: save it as UTF-8"
            ) from None
        except csv.Error as exc:
            raise NulltextError(_one_line(f"captions file {file}: malformed CSV ({exc})")) from None

        image_paths = []
        relpaths = []
        for _line, image, _caption, _crop in rows:
            p = Path(image).expanduser()
            image_paths.append(p if p.is_absolute() else folder / p)
            relpaths.append(image if not p.is_absolute() else str(p))
        ids = _unique_ids([p.stem for p in image_paths], relpaths)
        entries = [
            _Entry(ident, p, caption, row_crop if row_crop is not None else default_crop)
            for ident, p, (_l, _i, caption, row_crop) in zip(ids, image_paths, rows)
        ]
        self.path = folder
        self.captions_file = file
        super().__init__(
            entries,
            resolution,
            limit,
            caption_source=str(file),
            missing_hint=FOLDER_HINT,
            exif_transpose=exif_transpose,
        )


_COCO_HOWTO = (
    "COCO is not bundled with nulltext; download val2017.zip and annotations_trainval2017.zip "
    "from https://cocodataset.org/#download, unzip both into one folder and pass "
    "data.dataset.root=<that folder>"
)


class CocoDataset(_CaptionedImages):
    """The paper's protocol: ``num_images`` random (image, caption) pairs from COCO val2017.

    Selection (deterministic): ``rng = random.Random(seed)``; the candidates are the ids of
    images that have at least one caption, sorted; ``rng.sample(candidates, num_images)`` picks
    the images (in that order), then for each, in order, ``rng.choice`` picks one of its
    captions (sorted by annotation id). ``limit`` keeps the first N of the chosen pairs, so it
    does not change which pairs come first. Ids are image file stems (e.g. ``000000397133``).

    ``annotations`` and ``images`` are relative to ``root`` unless absolute. A missing root,
    annotation file or image folder raises :class:`NulltextError` saying how to get COCO.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        annotations: str | os.PathLike = "annotations/captions_val2017.json",
        images: str | os.PathLike = "val2017",
        num_images: int = 100,
        seed: int = 0,
        *,
        resolution: int,
        limit: int | None = None,
    ) -> None:
        root_dir = _setting_path("data.dataset.root", root)
        if not root_dir.is_dir():
            raise NulltextError(f"COCO root not found: {root_dir}: {_COCO_HOWTO}")
        ann_file = _setting_path("data.dataset.annotations", annotations)
        ann_file = ann_file if ann_file.is_absolute() else root_dir / ann_file
        if not ann_file.is_file():
            raise NulltextError(f"COCO caption annotations not found: {ann_file}: {_COCO_HOWTO}")
        image_dir = _setting_path("data.dataset.images", images)
        image_dir = image_dir if image_dir.is_absolute() else root_dir / image_dir
        if not image_dir.is_dir():
            raise NulltextError(f"COCO image folder not found: {image_dir}: {_COCO_HOWTO}")
        num_images = check_int("data.dataset.num_images", num_images, 1)
        seed = check_seed("data.dataset.seed", seed)

        try:
            with ann_file.open(encoding="utf-8") as handle:
                data = json.load(handle)
            file_names = {int(img["id"]): str(img["file_name"]) for img in data["images"]}
            by_image: dict[int, list[tuple[int, str]]] = {}
            for ann in data["annotations"]:
                by_image.setdefault(int(ann["image_id"]), []).append(
                    (int(ann.get("id", 0)), str(ann["caption"]))
                )
        except json.JSONDecodeError as exc:
            raise NulltextError(
                f"COCO annotations {ann_file} line {exc.lineno}: invalid JSON ({exc.msg}); "
                "re-download annotations_trainval2017.zip"
            ) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise NulltextError(
                _one_line(
                    f"COCO annotations {ann_file} are not in COCO captions format (problem with "
                    f"{exc}); use annotations/captions_val2017.json"
                )
            ) from None

        candidates = sorted(i for i in by_image if i in file_names)
        if num_images > len(candidates):
            raise NulltextError(
                f"num_images={num_images} but {ann_file} lists only {len(candidates)} images "
                f"with captions: lower data.dataset.num_images"
            )
        rng = random.Random(int(seed))
        chosen = rng.sample(candidates, int(num_images))
        entries = []
        for image_id in chosen:
            _ann_id, caption = rng.choice(sorted(by_image[image_id]))
            path = image_dir / file_names[image_id]
            entries.append(_Entry(Path(file_names[image_id]).stem, path, caption))
        ids = _unique_ids([e.id for e in entries], [file_names[i] for i in chosen])
        entries = [_Entry(i, e.path, e.caption) for i, e in zip(ids, entries)]

        self.root = root_dir
        self.annotations_file = ann_file
        self.seed = int(seed)
        self.image_ids = chosen if limit is None else chosen[: check_limit(limit)]
        super().__init__(
            entries,
            resolution,
            limit,
            caption_source=str(ann_file),
            missing_hint=COCO_HINT,
        )


# --------------------------------------------------------------------------------------------
# Batching and the Lightning DataModule
# --------------------------------------------------------------------------------------------


def collate_items(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch records: good items are stacked, failures are passed through.

    Returns ``{"ids": [...], "images": uint8 [B, 3, R, R], "captions": [...], "failures":
    [{"id", "error"}, ...]}`` where ``ids``/``images``/``captions`` are aligned and hold only
    the good items (B may be 0: ``images`` is then an empty ``uint8`` tensor of shape
    ``[0, 3, 0, 0]``), and ``failures`` holds the bad ones in order.
    """
    ids, images, captions, failures = [], [], [], []
    for item in items:
        if "error" in item:
            failures.append({"id": item["id"], "error": item["error"]})
        else:
            ids.append(item["id"])
            images.append(item["image"])
            captions.append(item["caption"])
    stacked = torch.stack(images) if images else torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    return {"ids": ids, "images": stacked, "captions": captions, "failures": failures}


DatasetFactory = Callable[..., Dataset]


class InversionDataModule(L.LightningDataModule):
    """Wraps a dataset of records for ``trainer.test`` (and ``trainer.predict``).

    ``dataset`` is either

    * a **factory** (the Hydra route): any callable such as ``functools.partial(FolderDataset,
      path=...)``, which is what a nested node with ``_partial_: true`` instantiates to. It is
      called as ``dataset(resolution=resolution, limit=limit)`` (``limit`` only when not
      ``None``). So a config can leave ``resolution: null`` and the caller supplies the model's
      size: ``hydra.utils.instantiate(cfg.data, resolution=512)``. If ``resolution`` is ``None``
      the factory must already bind it (``partial(..., resolution=...)``), else
      :class:`NulltextError`;
    * or a ready ``Dataset`` instance, used as is (``resolution``, if given, must equal the
      dataset's; ``limit`` keeps its first N items).

    The dataset is built in ``__init__`` so configuration errors (missing folder, ...) surface
    before any model is loaded. Loaders never shuffle and batch with :func:`collate_items`.
    """

    def __init__(
        self,
        dataset: Dataset | DatasetFactory,
        batch_size: int = 1,
        num_workers: int = 0,
        resolution: int | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        batch_size = check_int("data.batch_size", batch_size, 1)
        num_workers = check_int("data.num_workers", num_workers, 0)  # 0: load in the main process
        limit = check_limit(limit)
        if resolution is not None:
            resolution = check_resolution(resolution)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.limit = limit

        if isinstance(dataset, Dataset):
            own = getattr(dataset, "resolution", None)
            if resolution is not None and own is not None and own != resolution:
                raise NulltextError(
                    f"the dataset was built at resolution {own} but resolution={resolution} was "
                    "requested: pass a dataset factory (_partial_: true) instead"
                )
            built: Dataset = dataset
            if limit is not None and limit < len(dataset):  # type: ignore[arg-type]
                built = Subset(dataset, range(limit))
            self.resolution = resolution if resolution is not None else own
        elif callable(dataset):
            kwargs: dict[str, Any] = {}
            if resolution is not None:
                kwargs["resolution"] = resolution
            elif not (isinstance(dataset, functools.partial) and "resolution" in dataset.keywords):
                raise NulltextError(
                    "data.resolution is null: pass the model's image size, e.g. "
                    "hydra.utils.instantiate(cfg.data, resolution=512)"
                )
            if limit is not None:
                kwargs["limit"] = limit
            built = dataset(**kwargs)
            self.resolution = getattr(built, "resolution", resolution)
        else:
            raise NulltextError(
                f"dataset must be a torch Dataset or a factory (_partial_: true), got "
                f"{type(dataset).__name__}"
            )
        self.dataset = built

    @property
    def ids(self) -> list[str]:
        """Item ids in loader order."""
        ds = self.dataset
        if isinstance(ds, Subset):
            base = getattr(ds.dataset, "ids", None)
            if base is not None:
                return [base[i] for i in ds.indices]
        ids = getattr(ds, "ids", None)
        if ids is not None:
            return list(ids)
        return [str(i) for i in range(len(ds))]  # type: ignore[arg-type]

    @property
    def captions(self) -> list[str]:
        """Captions aligned with :attr:`ids` (an item with an empty caption gives ""; that item
        itself loads as a failure record). Used e.g. as the pool of the random-caption ablation."""
        ds = self.dataset
        base, indices = (ds.dataset, list(ds.indices)) if isinstance(ds, Subset) else (ds, None)
        captions = getattr(base, "captions", None)
        if captions is None:  # a foreign dataset: read its items (loads the images)
            return [str(ds[i].get("caption", "")) for i in range(len(ds))]  # type: ignore[arg-type]
        captions = list(captions)
        return captions if indices is None else [captions[i] for i in indices]

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_items,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
