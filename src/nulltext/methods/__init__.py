"""Inversion methods: one class each behind :class:`InversionMethod`; ``METHODS`` maps config names to classes."""

from nulltext.errors import UnknownNameError
from nulltext.methods.base import Inversion, InversionMethod, image_seed
from nulltext.methods.baselines import DDIMInversion, NegativePromptInversion, VAEReconstruction
from nulltext.methods.denoising import NullTextNoPivot, TextualInversion
from nulltext.methods.exact import BDIAInversion, EDICTInversion
from nulltext.methods.fixed_point import FixedPointInversion, ReNoiseInversion
from nulltext.methods.global_null_text import GlobalNullTextInversion
from nulltext.methods.pnp import DirectInversion, ProximalNegativePromptInversion
from nulltext.methods.null_text import NullTextInversion, RandomCaptionNullText, RandomPivotNullText, TextualInversionPivot
from nulltext.methods.reference import OfficialNullTextInversion

METHODS: dict[str, type[InversionMethod]] = {
    cls.name: cls
    for cls in (
        VAEReconstruction,
        DDIMInversion,
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
    )
}


def method_class(name: str | None) -> type[InversionMethod]:
    """The class whose sampler reconstructs an inversion named ``name`` (None: plain guided DDIM)."""
    if name is None:
        return InversionMethod
    if name not in METHODS:
        raise UnknownNameError(f"unknown inversion method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, **overrides) -> InversionMethod:
    """Instantiate a method by its config name with keyword overrides of its defaults."""
    if name not in METHODS:
        raise UnknownNameError(f"unknown inversion method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name](**overrides)


__all__ = ["METHODS", "Inversion", "InversionMethod", "image_seed", "make_method", "method_class", *[c.__name__ for c in METHODS.values()]]
