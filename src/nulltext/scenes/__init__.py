"""Procedural captioned scenes: a compositional toy world for a small text-to-image model.

Each scene is 1 to 3 flat-coloured objects on a textured background, with a template caption
that mentions every object::

    a large red circle on the left and a small blue cross at the top on a striped pink background

Vocabulary (module constants): 6 :data:`SHAPES` x 8 object :data:`COLOURS` x 2 :data:`SIZES` x
5 :data:`POSITIONS`, on 5 :data:`BACKGROUND_KINDS` x 5 :data:`BACKGROUND_COLOURS` (disjoint from
the object colours, and far from them in CIELAB, so objects can be read back by colour).
:data:`HELD_OUT_PAIRS` lists 6 (colour, shape) pairs that ``split="train"`` never renders and
``split="heldout"`` renders in every scene (exactly one object per held-out scene).

Geometry, in fractions of the image side (``x`` right, ``y`` down): an object's extent is a
half-size ``r`` (:data:`SIZE_RADII`) around its position centre (:data:`POSITION_CENTRES`) plus
a seeded jitter of at most :data:`JITTER`; objects of one scene take distinct positions and
never touch (adjacent centres are 0.32 apart, two large objects plus jitter span at most 0.28).

API:

* :func:`sample_layout` draws the scene content (a :class:`SceneLayout` of index tensors, seeded,
  on the CPU); :func:`render_layout` draws it at any resolution on any device (a pure function:
  signed-distance shapes with one-pixel anti-aliasing, so the same layout looks the same at
  64 or 512 px); :func:`render_scenes` does both and returns ``(images, captions, scenes)``.
* :class:`Scene` / :class:`SceneObject` are the structured attributes of one scene.
* :class:`ScenesDataset`: a deterministic dataset of held-out scenes with the conventions of
  :mod:`nulltext.data` (``ids``, ``captions``, ``resolution``, items ``{"id", "image",
  "caption"}``) plus ``attributes`` (one :class:`Scene` per item).
* :class:`SceneChecker` reads colour, position, shape (and size) back from images.

Modules: :mod:`~nulltext.scenes.layouts` (vocabulary, captions, :class:`Scene`, layouts),
:mod:`~nulltext.scenes.render`, :mod:`~nulltext.scenes.dataset`, :mod:`~nulltext.scenes.checker`.

Randomness: a scene's random draws all come from its own fixed-size row of uniforms
(``_DRAWS_PER_SCENE`` per scene, in :mod:`~nulltext.scenes.layouts`) drawn on the CPU by a
``torch.Generator`` seeded with ``2 * seed + (split == "heldout")``, so the two splits never
share a random stream and scene ``i`` does not depend on ``n`` (``render_scenes(10, s)`` is the
first 10 of ``render_scenes(100, s)``; tested), nor on the resolution or the device.
"""

from nulltext.scenes.checker import CheckResult, SceneChecker, rgb_to_lab
from nulltext.scenes.dataset import ScenesDataset
from nulltext.scenes.layouts import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    BACKGROUND_TONES,
    COLOURS,
    COLOUR_RGB,
    HELD_OUT_PAIRS,
    JITTER,
    MAX_OBJECTS,
    POSITIONS,
    POSITION_CENTRES,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    SIZE_RADII,
    SPLITS,
    TRAIN_PAIRS,
    LayoutTokenizer,
    Scene,
    SceneLayout,
    SceneObject,
    layout_from_scenes,
    sample_layout,
)
from nulltext.scenes.render import RenderedScenes, object_coverage, render_layout, render_scenes

__all__ = [
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "SIZES",
    "SIZE_RADII",
    "POSITIONS",
    "POSITION_CENTRES",
    "POSITION_PHRASES",
    "BACKGROUND_KINDS",
    "BACKGROUND_COLOURS",
    "BACKGROUND_TONES",
    "MAX_OBJECTS",
    "JITTER",
    "HELD_OUT_PAIRS",
    "TRAIN_PAIRS",
    "SPLITS",
    "SceneObject",
    "Scene",
    "SceneLayout",
    "LayoutTokenizer",
    "RenderedScenes",
    "sample_layout",
    "layout_from_scenes",
    "render_layout",
    "object_coverage",
    "render_scenes",
    "ScenesDataset",
    "CheckResult",
    "SceneChecker",
    "rgb_to_lab",
]
