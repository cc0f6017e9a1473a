"""Procedural captioned scenes (being split into modules: the layouts module holds them all for now)."""

from nulltext.scenes.layouts import *  # noqa: F401,F403
from nulltext.scenes.layouts import __all__  # noqa: F401
