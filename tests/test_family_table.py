"""The family x method table: generated from the methods' classes, with a reason for every family a
method leaves out, and README's copy equal to what ``scripts/family_table.py`` prints."""

import runpy
from pathlib import Path

import pytest

from nulltext.families import FAMILIES
from nulltext.methods import METHODS, InversionMethod, check_family, family_table, not_applicable_reason
from nulltext.validation import SettingError

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_holds_the_table_the_script_prints(capsys):
    runpy.run_path(str(ROOT / "scripts" / "family_table.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed == family_table()
    section = (ROOT / "README.md").read_text().split("## Model families")[1].split("\n## ")[0]
    assert printed in section, "README's family table is out of date: paste the output of `python scripts/family_table.py`"


def test_every_method_runs_on_its_families_and_says_in_one_line_why_not_on_the_others():
    table = family_table().splitlines()
    assert table[0] == "| method | sd | sdxl | sd3 | flux |"
    for row, (name, cls) in zip(table[2:], METHODS.items(), strict=True):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0] == f"`{name}`"
        for family, cell in zip(FAMILIES, cells[1:], strict=True):
            reason = not_applicable_reason(cls, family)
            if family in cls.families:
                assert reason is None and cell == "supported"
            else:
                assert reason and "|" not in reason and "\n" not in reason and cell == f"n/a: {reason}"
        # An own reason for a family the method runs on would be stale text.
        assert set(vars(cls).get("not_applicable", {})) <= set(FAMILIES) - set(cls.families), name


def test_reasons_are_the_methods_own_inherited_or_derived_from_the_samplers():
    assert "no unconditional branch" in not_applicable_reason(METHODS["null_text"], "flux")
    # Inherited: the null-text ablations have no null embedding to optimise on FLUX either.
    assert not_applicable_reason(METHODS["random_pivot"], "flux") == not_applicable_reason(METHODS["null_text"], "flux")
    assert "Fig. 4" in not_applicable_reason(METHODS["random_pivot"], "sdxl")
    assert not_applicable_reason(METHODS["ddim"], "sd3") == "inverts DDIM sampling; SD3 samples by rectified-flow Euler"
    assert not_applicable_reason(METHODS["flow_inversion"], "sdxl") == "inverts rectified-flow Euler sampling; SDXL samples by DDIM"

    class SD3Only(InversionMethod):  # a method added later, with no reasons of its own
        name = "sd3_only"
        families = ("sd3",)

        def invert(self, diffusion, z0, prompts, seeds, monitor=None):
            raise NotImplementedError

    assert not_applicable_reason(SD3Only, "sd") == "inverts rectified-flow Euler sampling; SD samples by DDIM"
    assert not_applicable_reason(SD3Only, "flux") == "not ported to FLUX yet"
    assert not_applicable_reason(SD3Only(), "sd3") is None


def test_a_method_on_another_family_stops_with_the_reason():
    with pytest.raises(SettingError) as error:
        check_family(METHODS["null_text_global"](), "sdxl")
    assert str(error.value).endswith(f"(null_text_global: {not_applicable_reason(METHODS['null_text_global'], 'sdxl')})")
