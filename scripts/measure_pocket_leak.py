"""Measure the caption leak of a saved pocket model (:mod:`nulltext.pocket.leak`): where each
cross-attention layer's mass goes (start token / caption words / EOS / padding), how much the text
encoder's output changes per position class when a colour word is swapped, and optionally the
footprint of null-text + Prompt-to-Prompt colour swaps.

    python scripts/measure_pocket_leak.py                                  # models/pocket
    python scripts/measure_pocket_leak.py --model DIR --out DIR --edit-cases 4
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from nulltext.pocket.leak import main  # noqa: E402

if __name__ == "__main__":
    main()
