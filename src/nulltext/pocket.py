"""The project's offline trained model "pocket" (``models/pocket`` beside the package's repository).

``conf/model/pocket.yaml`` instantiates :func:`load_pocket`, so the model loads from any working
directory in a clone of the repository. Training: ``scripts/train_pocket_model.py``; evaluation:
``scripts/evaluate_pocket_model.py``; model card: ``models/pocket/README.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import StableDiffusionPipeline

from nulltext.errors import ModelUnavailableError
from nulltext.models import load_pipeline

__all__ = ["pocket_path", "pocket_folder", "load_pocket"]


def pocket_path() -> str:
    """Absolute path of ``models/pocket`` in the repository that holds this package (src layout),
    or ``$NULLTEXT_POCKET`` when set."""
    override = os.environ.get("NULLTEXT_POCKET")
    if override:
        return str(Path(override).expanduser().resolve())
    return str(Path(__file__).resolve().parents[2] / "models" / "pocket")


def pocket_folder(path: str | None = None) -> Path:
    """The pocket model's folder (``path``, else :func:`pocket_path`); a one-line error when it is not there."""
    folder = Path(path).expanduser() if path else Path(pocket_path())
    if not (folder / "model_index.json").exists():
        raise ModelUnavailableError(
            f"the pocket model is not at {folder}: train it with `python scripts/train_pocket_model.py` "
            "(GPU) or `--config-name train_pocket_cpu` (CPU stand-in), or set NULLTEXT_POCKET"
        )
    return folder


def load_pocket(path: str | None = None) -> StableDiffusionPipeline:
    """Load pocket (frozen, float32) with :func:`nulltext.models.load_pipeline`."""
    return load_pipeline(str(pocket_folder(path)))
