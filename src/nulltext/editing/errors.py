"""The editing error: a :class:`~nulltext.errors.NulltextError`, so the CLI prints one line and exits 2."""

from nulltext.errors import NulltextError


class EditError(NulltextError):
    """Edit settings that cannot be applied (unknown word, mismatched prompts, missing input...)."""
