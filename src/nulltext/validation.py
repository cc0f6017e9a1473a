"""Checks of user settings where they enter (constructors of methods, samplers, data, apps).

Each check returns the value converted to its type, or raises :class:`SettingError` with one line
that names the setting, the value given and what is allowed, so the command line can print it
before any model loads.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from nulltext.errors import NulltextError


class SettingError(NulltextError, ValueError):
    """A setting is out of range, of the wrong type, or not one of the known names (a ValueError too)."""


def _reject(name: str, value: Any, allowed: str) -> SettingError:
    return SettingError(f"{name}={value!r} is not allowed: {allowed}")


def check_int(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum] (bools and non-integral floats are refused)."""
    bounds = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else "") if b)
    allowed = f"an integer{' ' + bounds if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise _reject(name, value, allowed)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _reject(name, value, allowed)
    return value


def check_float(
    name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *, strict_minimum: bool = False
) -> float:
    """A finite number in [minimum, maximum] ((minimum, maximum] with ``strict_minimum``)."""
    low = f"> {minimum}" if strict_minimum else f">= {minimum}"
    bounds = " and ".join(b for b in (low if minimum is not None else "", f"<= {maximum}" if maximum is not None else "") if b)
    allowed = f"a finite number{' ' + bounds if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _reject(name, value, allowed)
    value = float(value)
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise _reject(name, value, allowed)
    if maximum is not None and value > maximum:
        raise _reject(name, value, allowed)
    return value


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0 (learning rates, scales)."""
    return check_float(name, value, 0.0, strict_minimum=True)


def check_probability(name: str, value: Any) -> float:
    """A number in [0, 1]."""
    return check_float(name, value, 0.0, 1.0)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise _reject(name, value, "one of " + ", ".join(map(repr, choices)))
    return value


# numpy's seeding (and so Lightning's seed_everything) accepts 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1


def check_seed(name: str, value: Any) -> int:
    """A random seed: an integer in [0, 2**32 - 1]."""
    return check_int(name, value, 0, SEED_MAX)


def check_bool(name: str, value: Any) -> bool:
    """true or false (not a string or a number that would silently count as one)."""
    if not isinstance(value, bool):
        raise _reject(name, value, "true or false")
    return value


def check_text(name: str, value: Any) -> str:
    """A non-empty string (a prompt, a caption, a word)."""
    if not isinstance(value, str) or not value.strip():
        raise _reject(name, value, "a non-empty text")
    return value


def check_given(cfg: DictConfig) -> None:
    """Every mandatory setting (``???`` in a config) has a value; Hydra's jobs' own keys aside."""
    missing = [key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra.")]
    if missing:
        raise SettingError(f"{', '.join(sorted(missing))}: required, give {missing[0]}=<value> on the command line")


def check_multiple(name: str, value: Any, factor: int) -> int:
    """A positive multiple of ``factor`` (an image side the model's VAE can downsample evenly)."""
    value = check_int(name, value, factor)
    if value % factor:
        raise _reject(name, value, f"a multiple of {factor} (the model's VAE downsampling factor), e.g. {value - value % factor}")
    return value
