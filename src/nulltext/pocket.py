"""The project's offline trained model "pocket" (``models/pocket`` beside the package's repository).

``conf/model/pocket.yaml`` instantiates :func:`load_pocket`, so the model loads from any working
directory in a clone of the repository. Training: ``scripts/train_pocket_model.py``; evaluation:
``scripts/evaluate_pocket_model.py``; model card: ``models/pocket/README.md``.
"""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from nulltext.models import load_pipeline, pocket_folder, pocket_path

__all__ = ["pocket_path", "pocket_folder", "load_pocket"]


def load_pocket(path: str | None = None) -> StableDiffusionPipeline:
    """Load pocket (frozen, float32) with :func:`nulltext.models.load_pipeline`."""
    return load_pipeline(str(pocket_folder(path)))
