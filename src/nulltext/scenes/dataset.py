"""A deterministic dataset of procedural scenes with the conventions of :mod:`nulltext.data`."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from nulltext.data import check_limit, check_resolution
from nulltext.scenes.layouts import Scene, SceneLayout, check_count, check_seed, check_split, sample_layout
from nulltext.scenes.render import render_layout

class ScenesDataset(Dataset):
    """``num_images`` procedural scenes (``split="heldout"`` by default: each with one object of
    a held-out colour-shape pair), deterministic in ``seed``; the :mod:`nulltext.data`
    conventions: ``ids`` (``scene-0000``, ...), ``captions``, ``resolution``, items ``{"id",
    "image": uint8 [3, R, R], "caption"}``; ``limit`` keeps the first N (the same N scenes as
    ``num_images=N``). ``attributes`` holds each item's :class:`Scene` for evaluation (e.g.
    :class:`SceneChecker`). Images are drawn on the CPU when an item is read."""

    def __init__(
        self,
        resolution: int,
        num_images: int = 16,
        seed: int = 0,
        split: str = "heldout",
        limit: int | None = None,
    ) -> None:
        self.resolution = check_resolution(resolution)
        num_images = check_count(num_images, "num_images")
        limit = check_limit(limit)
        self.seed = check_seed(seed)
        self.split = check_split(split)
        if limit is not None:
            num_images = min(num_images, limit)
        self._layout = sample_layout(num_images, self.seed, self.split)
        width = max(4, len(str(max(num_images - 1, 0))))
        self._ids = [f"scene-{i:0{width}d}" for i in range(num_images)]
        self._captions = self._layout.captions()
        self.attributes: list[Scene] = self._layout.scenes()

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def captions(self) -> list[str]:
        return list(self._captions)

    @property
    def layout(self) -> SceneLayout:
        return self._layout

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} scenes")
        image = render_layout(self._layout[i], self.resolution)[0]
        return {"id": self._ids[i], "image": image, "caption": self._captions[i]}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, resolution={self.resolution}, "
            f"seed={self.seed}, split={self.split!r})"
        )
