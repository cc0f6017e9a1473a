"""Measure a pocket candidate against issue 17's bar for replacing the shipped model
(:mod:`nulltext.pocket.ship`): attention ratio, null-text + Prompt-to-Prompt edit_bench with local
blend, text control; exit status 0 when it ships.

    python scripts/pocket_ship_check.py --model outputs/train_pocket/cpu_grounded/model
    python scripts/pocket_ship_check.py --model DIR --cases 4 --attention-images 4 --text-images 8   # a quick look
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from nulltext.pocket.ship import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
