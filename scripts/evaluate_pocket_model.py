"""Evaluate the pocket model (:mod:`nulltext.pocket.evaluation`): text control, autoencoder quality,
the null-text ablation ordering and attention localisation.

    python scripts/evaluate_pocket_model.py                         # models/pocket, defaults
    python scripts/evaluate_pocket_model.py --model PATH --out DIR --text-images 48 --inv-images 4
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from nulltext.pocket.evaluation import main  # noqa: E402

if __name__ == "__main__":
    main()
