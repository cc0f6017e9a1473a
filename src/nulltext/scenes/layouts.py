"""The scene world's vocabulary, captions, structured attributes and layouts.

:func:`sample_layout` draws the content of ``n`` scenes (a :class:`SceneLayout` of index tensors,
seeded, on the CPU); :func:`layout_from_scenes` builds one from :class:`Scene` descriptions. The
vocabulary and the randomness conventions are described in :mod:`nulltext.scenes`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from nulltext.errors import NulltextError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
"""Object shapes. ``cross`` is a plus sign; ``diamond`` a tall rhombus (not a rotated square);
``triangle`` equilateral, pointing up. All stay distinct at 64 px, small size included."""

COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
"""Object colours (the objects are flat, exactly these sRGB values)."""

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 25),
    "green": (25, 165, 45),
    "blue": (30, 70, 225),
    "purple": (150, 40, 170),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
# CIELAB distances: closest object pair blue/purple 39, red/orange 47; every object colour is
# >= 35 from every background tone (white/beige is the closest).

SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADII: dict[str, float] = {"small": 0.08, "large": 0.125}
"""Half-extent ``r`` of an object, as a fraction of the image side (64 px: 5.1 and 8 px)."""

POSITIONS: tuple[str, ...] = ("left", "center", "right", "top", "bottom")
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.18, 0.5),
    "center": (0.5, 0.5),
    "right": (0.82, 0.5),
    "top": (0.5, 0.18),
    "bottom": (0.5, 0.82),
}
"""``(x, y)`` centre of each position, fractions of the image side, ``y`` pointing down."""
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

JITTER = 0.015
"""Largest random offset of an object from its position centre, per axis (about 1 px at 64)."""

MAX_OBJECTS = 3

BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "stripes", "checker", "noise")
_BACKGROUND_PATTERNS: dict[str, str] = {  # "on a <pattern> background", {} = colour word
    "plain": "plain {}",
    "gradient": "{} gradient",
    "stripes": "striped {}",
    "checker": "checkered {}",
    "noise": "mottled {}",
}
BACKGROUND_COLOURS: tuple[str, ...] = ("pink", "gray", "beige", "teal", "brown")
BACKGROUND_TONES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "pink": ((240, 160, 190), (225, 140, 175)),
    "gray": ((145, 145, 145), (120, 120, 120)),
    "beige": ((210, 190, 140), (190, 170, 120)),
    "teal": ((40, 150, 150), (30, 130, 130)),
    "brown": ((145, 95, 55), (125, 80, 45)),
}
"""The two tones of each background colour: every background pixel is a mix of the two (a
gradient between them, stripes or checks of them, or smooth noise between them)."""

_NOISE_GRID = 8  # smooth value noise: an 8x8 grid of uniforms, bicubically upsampled

HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("orange", "ring"),
    ("yellow", "square"),
    ("green", "cross"),
    ("blue", "circle"),
    ("purple", "diamond"),
)
"""(colour, shape) pairs never rendered in training scenes: 6 distinct colours and 6 distinct
shapes, so every colour keeps >= 5 shapes and every shape >= 7 colours in training."""

TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS
)
"""The 42 (colour, shape) pairs of ``split="train"``, sampled uniformly."""

SPLITS: tuple[str, ...] = ("train", "heldout")

# Index forms (used by the vectorised code).
_N_SHAPES, _N_COLOURS, _N_SIZES, _N_POS = len(SHAPES), len(COLOURS), len(SIZES), len(POSITIONS)
_N_KINDS, _N_BG = len(BACKGROUND_KINDS), len(BACKGROUND_COLOURS)
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_SIZE_INDEX = {s: i for i, s in enumerate(SIZES)}
_POSITION_INDEX = {p: i for i, p in enumerate(POSITIONS)}
_KIND_INDEX = {k: i for i, k in enumerate(BACKGROUND_KINDS)}
_BG_INDEX = {c: i for i, c in enumerate(BACKGROUND_COLOURS)}
_TRAIN_PAIR_IDX = torch.tensor([[_COLOUR_INDEX[c], _SHAPE_INDEX[s]] for c, s in TRAIN_PAIRS])
_HELD_PAIR_IDX = torch.tensor([[_COLOUR_INDEX[c], _SHAPE_INDEX[s]] for c, s in HELD_OUT_PAIRS])
# Tensor forms shared by the renderer and the checker.
CENTRE_TABLE = torch.tensor([POSITION_CENTRES[p] for p in POSITIONS], dtype=torch.float64)
COLOUR_TABLE = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32)
TONE_TABLE = torch.tensor(
    [BACKGROUND_TONES[c] for c in BACKGROUND_COLOURS], dtype=torch.float32
)  # [5, 2, 3]

# --------------------------------------------------------------------------------------------
# Captions: phrase tables, built once
# --------------------------------------------------------------------------------------------


def _object_code(colour: int, shape: int, size: int, position: int) -> int:
    return ((colour * _N_SHAPES + shape) * _N_SIZES + size) * _N_POS + position


_OBJECT_PHRASES: tuple[str, ...] = tuple(
    f"a {SIZES[z]} {COLOURS[c]} {SHAPES[s]} {POSITION_PHRASES[POSITIONS[p]]}"
    for c in range(_N_COLOURS)
    for s in range(_N_SHAPES)
    for z in range(_N_SIZES)
    for p in range(_N_POS)
)  # indexed by _object_code
_BACKGROUND_NOUNS: tuple[str, ...] = tuple(  # indexed by kind * 5 + colour
    f"{_BACKGROUND_PATTERNS[k].format(c)} background"
    for k in BACKGROUND_KINDS
    for c in BACKGROUND_COLOURS
)
_BACKGROUND_TAILS: tuple[str, ...] = tuple(f" on a {noun}" for noun in _BACKGROUND_NOUNS)


def _caption_from_codes(codes: Sequence[int], background: int) -> str:
    """Caption from object codes (in caption order) and a ``kind * 5 + colour`` code."""
    phrases = [_OBJECT_PHRASES[c] for c in codes]
    if not phrases:
        return f"a {_BACKGROUND_NOUNS[background]}"
    if len(phrases) == 1:
        objects = phrases[0]
    else:
        objects = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return objects + _BACKGROUND_TAILS[background]


# --------------------------------------------------------------------------------------------
# Structured attributes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One object: names from :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`, :data:`POSITIONS`."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, table in (
            ("shape", _SHAPE_INDEX),
            ("colour", _COLOUR_INDEX),
            ("size", _SIZE_INDEX),
            ("position", _POSITION_INDEX),
        ):
            value = getattr(self, name)
            if value not in table:
                raise NulltextError(f"unknown {name} {value!r}: use one of {sorted(table)}")

    @property
    def code(self) -> int:
        return _object_code(
            _COLOUR_INDEX[self.colour],
            _SHAPE_INDEX[self.shape],
            _SIZE_INDEX[self.size],
            _POSITION_INDEX[self.position],
        )

    @property
    def phrase(self) -> str:
        """E.g. ``"a large red circle on the left"``."""
        return _OBJECT_PHRASES[self.code]

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Scene:
    """The structured attributes of one scene; ``objects`` are in caption order."""

    objects: tuple[SceneObject, ...]
    background: str  # a BACKGROUND_KINDS name
    background_colour: str  # a BACKGROUND_COLOURS name

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if len(objects) > MAX_OBJECTS:
            raise NulltextError(f"a scene has at most {MAX_OBJECTS} objects, got {len(objects)}")
        positions = [o.position for o in objects]
        if len(set(positions)) != len(positions):
            raise NulltextError(f"objects of a scene need distinct positions, got {positions}")
        if self.background not in _KIND_INDEX:
            raise NulltextError(
                f"unknown background {self.background!r}: use one of {list(BACKGROUND_KINDS)}"
            )
        if self.background_colour not in _BG_INDEX:
            raise NulltextError(
                f"unknown background colour {self.background_colour!r}: use one of "
                f"{list(BACKGROUND_COLOURS)}"
            )

    @property
    def caption(self) -> str:
        code = _KIND_INDEX[self.background] * _N_BG + _BG_INDEX[self.background_colour]
        return _caption_from_codes([o.code for o in self.objects], code)

    @property
    def held_out(self) -> bool:
        """Whether any object is a held-out (colour, shape) pair."""
        return any(o.held_out for o in self.objects)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form; :meth:`from_dict` inverts it."""
        return {
            "objects": [o.as_dict() for o in self.objects],
            "background": self.background,
            "background_colour": self.background_colour,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        return cls(
            objects=tuple(SceneObject(**dict(o)) for o in data["objects"]),
            background=str(data["background"]),
            background_colour=str(data["background_colour"]),
        )


def as_scene(scene: Scene | Mapping[str, Any]) -> Scene:
    if isinstance(scene, Scene):
        return scene
    if isinstance(scene, Mapping):
        return Scene.from_dict(scene)
    raise NulltextError(f"expected a Scene or its as_dict() mapping, got {type(scene).__name__}")


# --------------------------------------------------------------------------------------------
# Layouts: the sampled content of a batch of scenes, as index tensors
# --------------------------------------------------------------------------------------------

# Columns of the per-scene block of uniforms (fixed, so scene i never depends on n).
_U_COUNT = 0
_U_POS = slice(1, 6)
_U_PAIR = slice(6, 9)
_U_SIZE = slice(9, 12)
_U_JITTER = slice(12, 18)
_U_HELD_SLOT = 18
_U_HELD_PAIR = 19
_U_KIND = 20
_U_BG = 21
_U_SWAP = 22
_U_ANGLE = 23
_U_ORIENT = 24
_U_PHASE = slice(25, 27)
_U_NOISE = slice(32, 32 + _NOISE_GRID * _NOISE_GRID)
_DRAWS_PER_SCENE = 128  # room to spare: adding a draw must not shift the others


@dataclass(frozen=True)
class SceneLayout:
    """Index tensors (CPU) describing ``n`` scenes; objects beyond ``count`` are padding (0).

    ``shape``, ``colour``, ``size``, ``position``: int64 ``[n, 3]`` indices into the vocabulary;
    ``offset``: float64 ``[n, 3, 2]`` jitter ``(dx, dy)``; ``count``: int64 ``[n]``; ``kind``,
    ``background``: int64 ``[n]``; ``swap``: bool ``[n]`` (which tone is first); ``angle``:
    float64 ``[n]`` (gradient direction); ``orientation``: int64 ``[n]`` (stripes: vertical,
    horizontal, diagonal, anti-diagonal); ``phase``: float64 ``[n, 2]`` (stripes/checker);
    ``noise``: float32 ``[n, 8, 8]`` (noise background).
    """

    count: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    offset: torch.Tensor
    kind: torch.Tensor
    background: torch.Tensor
    swap: torch.Tensor
    angle: torch.Tensor
    orientation: torch.Tensor
    phase: torch.Tensor
    noise: torch.Tensor

    def __len__(self) -> int:
        return int(self.count.shape[0])

    def __getitem__(self, index: int | slice | torch.Tensor) -> SceneLayout:
        """A sub-layout (an int keeps a batch dimension of 1)."""
        if isinstance(index, numbers.Integral):
            n = len(self)
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"scene index {index} out of range for {n} scenes")
            index = slice(i, i + 1)
        return SceneLayout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[n, 3]``: which object slots are used."""
        return torch.arange(MAX_OBJECTS) < self.count[:, None]

    @property
    def object_codes(self) -> torch.Tensor:
        """int64 ``[n, 3]``: each object slot's index into the phrase table (see ``_object_code``)."""
        return ((self.colour * _N_SHAPES + self.shape) * _N_SIZES + self.size) * _N_POS + self.position

    @property
    def background_codes(self) -> torch.Tensor:
        """int64 ``[n]``: ``kind * 5 + colour``, the index into the background tables."""
        return self.kind * _N_BG + self.background

    def captions(self) -> list[str]:
        """One caption per scene, from the precomputed phrase tables (about 1 us per caption)."""
        codes = self.object_codes
        bg = self.background_codes.tolist()
        phrases = _OBJECT_PHRASES
        tails = _BACKGROUND_TAILS
        out = []
        append = out.append
        for n, (a, b, c), g in zip(self.count.tolist(), codes.tolist(), bg):
            if n == 3:
                append(phrases[a] + ", " + phrases[b] + " and " + phrases[c] + tails[g])
            elif n == 2:
                append(phrases[a] + " and " + phrases[b] + tails[g])
            elif n == 1:
                append(phrases[a] + tails[g])
            else:
                append(f"a {_BACKGROUND_NOUNS[g]}")
        return out

    def scenes(self) -> list[Scene]:
        """The structured attributes, one :class:`Scene` per layout row."""
        out = []
        rows = zip(
            self.count.tolist(),
            self.shape.tolist(),
            self.colour.tolist(),
            self.size.tolist(),
            self.position.tolist(),
            self.kind.tolist(),
            self.background.tolist(),
        )
        for n, sh, co, si, po, k, bg in rows:
            objects = tuple(
                SceneObject(SHAPES[sh[j]], COLOURS[co[j]], SIZES[si[j]], POSITIONS[po[j]])
                for j in range(n)
            )
            out.append(Scene(objects, BACKGROUND_KINDS[k], BACKGROUND_COLOURS[bg]))
        return out


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise NulltextError(f"unknown split {split!r}: use one of {list(SPLITS)}")
    return split


def check_count(n: Any, name: str = "n") -> int:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise NulltextError(f"{name} must be an integer >= 0, got {n!r}")
    return int(n)


def check_seed(seed: Any) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise NulltextError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def _pick(u: torch.Tensor, k: int) -> torch.Tensor:
    """Uniforms in [0, 1) -> integers in [0, k)."""
    return (u * k).long().clamp_(0, k - 1)


def sample_layout(n: int, seed: int, split: str = "train") -> SceneLayout:
    """Draw the content of ``n`` scenes (deterministic in ``seed``; scene ``i`` does not depend
    on ``n``). ``"train"`` objects use :data:`TRAIN_PAIRS` only; in ``"heldout"`` scenes exactly
    one object (at a random place in the caption) is a :data:`HELD_OUT_PAIRS` pair and the
    others are training pairs. Counts, positions (distinct per scene), sizes, background kinds
    and colours are uniform."""
    n = check_count(n)
    seed = check_seed(seed)
    split = check_split(split)
    # One random stream per (seed, split): held-out scenes do not mirror training layouts.
    g = torch.Generator().manual_seed((2 * seed + SPLITS.index(split)) % 2**64)
    u = torch.rand(n, _DRAWS_PER_SCENE, generator=g, dtype=torch.float64)

    count = _pick(u[:, _U_COUNT], MAX_OBJECTS) + 1
    position = u[:, _U_POS].argsort(dim=1)[:, :MAX_OBJECTS]
    pair = _TRAIN_PAIR_IDX[_pick(u[:, _U_PAIR], len(TRAIN_PAIRS))]  # [n, 3, 2]
    if split == "heldout":
        slot = _pick(u[:, _U_HELD_SLOT], 1 << 30) % count  # uniform over the used slots
        held = _HELD_PAIR_IDX[_pick(u[:, _U_HELD_PAIR], len(HELD_OUT_PAIRS))]  # [n, 2]
        is_slot = torch.arange(MAX_OBJECTS)[None, :] == slot[:, None]
        pair = torch.where(is_slot[..., None], held[:, None, :], pair)
    size = _pick(u[:, _U_SIZE], _N_SIZES)
    offset = (u[:, _U_JITTER].reshape(n, MAX_OBJECTS, 2) * 2 - 1) * JITTER

    valid = torch.arange(MAX_OBJECTS)[None, :] < count[:, None]
    zero = torch.zeros((), dtype=torch.long)
    return SceneLayout(
        count=count,
        shape=torch.where(valid, pair[..., 1], zero),
        colour=torch.where(valid, pair[..., 0], zero),
        size=torch.where(valid, size, zero),
        position=torch.where(valid, position, zero),
        offset=torch.where(valid[..., None], offset, 0.0),
        kind=_pick(u[:, _U_KIND], _N_KINDS),
        background=_pick(u[:, _U_BG], _N_BG),
        swap=u[:, _U_SWAP] < 0.5,
        angle=u[:, _U_ANGLE] * (2 * math.pi),
        orientation=_pick(u[:, _U_ORIENT], 4),
        phase=u[:, _U_PHASE].clone(),
        noise=u[:, _U_NOISE].reshape(n, _NOISE_GRID, _NOISE_GRID).float(),
    )


def layout_from_scenes(
    scenes: Sequence[Scene | Mapping[str, Any]], seed: int = 0, jitter: bool = True
) -> SceneLayout:
    """A layout with the content of ``scenes`` (objects, background kind and colour) and the
    nuisance draws (jitter, pattern phase/direction, noise) of ``sample_layout(len(scenes),
    seed)``; ``jitter=False`` centres every object exactly on its position. Scenes may have 0
    objects (a pure background)."""
    scenes = [as_scene(s) for s in scenes]
    base = sample_layout(len(scenes), seed)
    n = len(scenes)
    idx = torch.zeros(4, n, MAX_OBJECTS, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for j, o in enumerate(scene.objects):
            idx[0, i, j] = _SHAPE_INDEX[o.shape]
            idx[1, i, j] = _COLOUR_INDEX[o.colour]
            idx[2, i, j] = _SIZE_INDEX[o.size]
            idx[3, i, j] = _POSITION_INDEX[o.position]
    count = torch.tensor([len(s.objects) for s in scenes], dtype=torch.long)
    valid = torch.arange(MAX_OBJECTS)[None, :] < count[:, None]
    offset = torch.where(valid[..., None], base.offset, 0.0) if jitter else base.offset * 0
    return SceneLayout(
        count=count,
        shape=idx[0],
        colour=idx[1],
        size=idx[2],
        position=idx[3],
        offset=offset,
        kind=torch.tensor([_KIND_INDEX[s.background] for s in scenes], dtype=torch.long),
        background=torch.tensor(
            [_BG_INDEX[s.background_colour] for s in scenes], dtype=torch.long
        ),
        swap=base.swap,
        angle=base.angle,
        orientation=base.orientation,
        phase=base.phase,
        noise=base.noise,
    )


class LayoutTokenizer:
    """CLIP token ids of layouts' captions as one ``[n, 77]`` tensor, without building strings.

    CLIP's BPE splits text into words and punctuation before merging, so a template caption's ids
    are the concatenation of its parts' ids: BOS, object phrase, ``,`` / ``and``, ..., background
    tail, EOS, then EOS padding (SD v1's convention). Each part's ids are looked up once per
    tokenizer; a batch is assembled with tensor gathers and one scatter per part (no per-caption
    Python), which is what keeps a training batch of 1024 off the host's critical path. Tested
    equal to ``tokenizer(layout.captions())``.
    """

    def __init__(self, tokenizer, context_length: int = 77):
        def table(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
            lengths = torch.tensor([len(i) for i in ids])
            padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
            for k, i in enumerate(ids):
                padded[k, : len(i)] = torch.tensor(i)
            return padded, lengths

        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.context_length = context_length
        self.phrases = table(_OBJECT_PHRASES)
        self.tails = table(_BACKGROUND_TAILS)
        self.lone_backgrounds = table([f"a {noun}" for noun in _BACKGROUND_NOUNS])  # scenes without objects
        self.joins = table([",", "and"])
        self.empty = torch.full((context_length,), self.eos, dtype=torch.long)  # the empty caption
        self.empty[0] = self.bos

    def __call__(self, layout: SceneLayout) -> torch.Tensor:
        n, count = len(layout), layout.count
        codes, bg = layout.object_codes, layout.background_codes
        none = torch.zeros(n, dtype=torch.long)
        # (table, row per scene, used) for each part in caption order
        parts = [
            (self.phrases, codes[:, 0], count >= 1),
            (self.joins, (count == 2).long(), count >= 2),  # "," before the middle of three, else "and"
            (self.phrases, codes[:, 1], count >= 2),
            (self.joins, none + 1, count == 3),
            (self.phrases, codes[:, 2], count == 3),
            (self.tails, bg, count >= 1),
            (self.lone_backgrounds, bg, count == 0),
        ]
        out = torch.full((n, self.context_length), self.eos, dtype=torch.long)
        out[:, 0] = self.bos
        position = torch.ones(n, dtype=torch.long)
        rows = torch.arange(n)[:, None]
        for (ids, lengths), index, used in parts:
            length = torch.where(used, lengths[index], 0)
            width = torch.arange(ids.shape[1])
            keep = width[None] < length[:, None]
            columns = position[:, None] + width[None]
            out[rows.expand_as(keep)[keep], columns[keep]] = ids[index][keep]
            position = position + length
        if int(position.max()) >= self.context_length:
            raise ValueError(f"a caption needs {int(position.max()) + 1} tokens, more than {self.context_length}")
        return out
