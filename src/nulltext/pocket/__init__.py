"""The project's offline trained model "pocket" (``models/pocket`` beside the package's repository).

``conf/model/pocket.yaml`` instantiates :func:`load_pocket`, so the model loads from any working
directory in a clone of the repository. Model card: ``models/pocket/README.md``.

Its training and evaluation live in this package (the scripts are thin wrappers):

- :mod:`~nulltext.pocket.recipe`: the recipe's settings checked, the models built, the seeding rules;
- :mod:`~nulltext.pocket.batches`: training batches drawn on the training device;
- :mod:`~nulltext.pocket.trainer`: the two phases (autoencoder; UNet + text encoder), checkpoints;
- :mod:`~nulltext.pocket.export`: the trained pipeline written as a ``save_pretrained`` folder;
- :mod:`~nulltext.pocket.evaluation`: text control, autoencoder, inversion ablation, attention;
- :mod:`~nulltext.pocket.job`: the one-call GPU job (train, evaluate, pack).

Training: ``scripts/train_pocket_model.py``; evaluation: ``scripts/evaluate_pocket_model.py``.
"""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from nulltext.models import load_pipeline, pocket_folder, pocket_path

__all__ = ["pocket_path", "pocket_folder", "load_pocket"]


def load_pocket(path: str | None = None) -> StableDiffusionPipeline:
    """Load pocket (frozen, float32) with :func:`nulltext.models.load_pipeline`."""
    return load_pipeline(str(pocket_folder(path)))
