"""Train "pocket": the project's small offline text-to-image latent diffusion model (SD family).

    python scripts/train_pocket_model.py                              # the GPU recipe (conf/train_pocket.yaml)
    python scripts/train_pocket_model.py --config-name train_pocket_cpu_grounded   # the shipped CPU-trained model
    python scripts/train_pocket_model.py max_minutes=9                # the same command again continues the run
    python scripts/train_pocket_model.py --config-name train_pocket_cpu_grounded_continue
                                                                      # train the shipped model's UNet further

The training is :func:`nulltext.pocket.trainer.train` (phases, checkpoints, ``init_from`` and
``vae_from``: see :mod:`nulltext.pocket.trainer`); this script reads the recipe with Hydra. A run
keeps its checkpoint outside the work tree (``~/.cache/nulltext/pocket/<run_name>`` by default):
the same command, in any clone, continues it; ``resume=false`` starts it afresh.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from nulltext.apps import report_errors  # noqa: E402
from nulltext.pocket.trainer import train  # noqa: E402


@hydra.main(config_path="../conf", config_name="train_pocket", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report_errors(train)(cfg)  # a bad setting: one line and exit status 2


if __name__ == "__main__":
    main()
