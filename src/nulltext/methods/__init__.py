"""Inversion methods: one class each behind :class:`InversionMethod`; ``METHODS`` maps config names to classes."""

import inspect

from nulltext.errors import UnknownNameError
from nulltext.families import FAMILIES
from nulltext.validation import SettingError
from nulltext.methods.base import Inversion, InversionMethod, image_seed
from nulltext.methods.baselines import DDIMInversion, FlowInversion, NegativePromptInversion, VAEReconstruction
from nulltext.methods.denoising import NullTextNoPivot, TextualInversion
from nulltext.methods.exact import BDIAInversion, EDICTInversion
from nulltext.methods.fixed_point import FixedPointInversion, ReNoiseInversion
from nulltext.methods.flow_solvers import FireFlowInversion, RFInversion, RFSolverInversion
from nulltext.methods.global_null_text import GlobalNullTextInversion
from nulltext.methods.pnp import DirectInversion, ProximalNegativePromptInversion
from nulltext.methods.null_text import NullTextInversion, RandomCaptionNullText, RandomPivotNullText, TextualInversionPivot
from nulltext.methods.reference import OfficialNullTextInversion
from nulltext.methods.uniinv import UniInversion

METHODS: dict[str, type[InversionMethod]] = {
    cls.name: cls
    for cls in (
        VAEReconstruction,
        DDIMInversion,
        FlowInversion,
        NullTextInversion,
        GlobalNullTextInversion,
        RandomPivotNullText,
        RandomCaptionNullText,
        TextualInversion,
        TextualInversionPivot,
        NullTextNoPivot,
        NegativePromptInversion,
        OfficialNullTextInversion,
        FixedPointInversion,
        EDICTInversion,
        BDIAInversion,
        DirectInversion,
        ProximalNegativePromptInversion,
        ReNoiseInversion,
        RFInversion,
        RFSolverInversion,
        FireFlowInversion,
        UniInversion,
    )
}


def method_class(name: str | None) -> type[InversionMethod]:
    """The class whose sampler reconstructs an inversion named ``name`` (None: plain guided DDIM)."""
    if name is None:
        return InversionMethod
    if name not in METHODS:
        raise UnknownNameError(f"unknown inversion method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def not_applicable_reason(method: InversionMethod | type[InversionMethod], family: str) -> str | None:
    """Why ``method`` does not run on models of ``family`` (None: it does), in a few words.

    The method's own reason (``not_applicable``, inherited along its classes), else a generic one:
    the family's sampler is not the one the method inverts, or the method is not ported to it yet.
    """
    if family in method.families:
        return None
    cls = method if isinstance(method, type) else type(method)
    for klass in cls.__mro__:
        if family in vars(klass).get("not_applicable", {}):
            return klass.not_applicable[family]
    sampler, inverted = FAMILIES[family].sampler, dict.fromkeys(FAMILIES[f].sampler for f in method.families)
    if sampler not in inverted:
        return f"inverts {' and '.join(inverted)} sampling; {family.upper()} samples by {sampler}"
    return f"not ported to {family.upper()} yet"


def check_family(method: InversionMethod | type[InversionMethod], family: str) -> None:
    """A :class:`SettingError` when ``method`` does not run on models of ``family`` (it names those that do, and why)."""
    if family not in method.families:
        others = [name for name, cls in METHODS.items() if family in cls.families]
        raise SettingError(
            f"inversion={method.name} does not run on {family} models (it runs on: {', '.join(method.families)}); "
            f"the methods for {family} models are: {', '.join(others)} ({method.name}: {not_applicable_reason(method, family)})"
        )


def family_table() -> str:
    """The README's family x method table (``scripts/family_table.py``): a row per method of
    :data:`METHODS`, a column per family of :data:`~nulltext.families.FAMILIES`, each cell
    "supported" or "n/a: " and :func:`not_applicable_reason`."""
    lines = ["| method | " + " | ".join(FAMILIES) + " |", "|---|" + "---|" * len(FAMILIES)]
    for name, cls in METHODS.items():
        cells = [f"n/a: {reason}" if (reason := not_applicable_reason(cls, family)) else "supported" for family in FAMILIES]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_method(name: str, **overrides) -> InversionMethod:
    """Instantiate a method by its config name with keyword overrides of its defaults."""
    if name not in METHODS:
        raise UnknownNameError(f"unknown inversion method {name!r}; choose one of: {', '.join(METHODS)}")
    known = method_options(METHODS[name])
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise UnknownNameError(f"unknown option(s) {', '.join(unknown)} of inversion method {name!r}; it has: {', '.join(known) or 'none'}")
    return METHODS[name](**overrides)


def method_options(cls: type[InversionMethod]) -> list[str]:
    """The settings a method's constructor takes (seen through ``*args, **kwargs`` pass-throughs to its base)."""
    for klass in cls.__mro__:
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if named or not any(p.kind == p.VAR_KEYWORD for p in params):
            return named
    return []


__all__ = ["METHODS", "Inversion", "InversionMethod", "check_family", "family_table", "image_seed", "make_method", "method_class", "method_options", "not_applicable_reason", *[c.__name__ for c in METHODS.values()]]
