#!/usr/bin/env python
"""Print the family x method table (markdown) of README's "Model families" from the methods' code.

Each method's families and, for the others, why it does not run on them (``nulltext.methods.family_table``);
tests/test_family_table.py checks that the README holds this table. After adding a method or a family,
paste the output into the README:

    python scripts/family_table.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from nulltext.methods import family_table  # noqa: E402

if __name__ == "__main__":
    print(family_table(), end="")
