"""Editing real images from their inversions: Prompt-to-Prompt attention control and SDEdit.

``edit(diffusion, inversion, target_prompts, settings) -> EditOutput`` is the entry point; the
attention controllers live in :mod:`nulltext.editing.attention`, the metrics in
:mod:`nulltext.editing.metrics`, and the ``nulltext edit`` / ``nulltext attention`` commands in
:mod:`nulltext.editing.cli`.
"""

from nulltext.editing.attention import (
    AttentionController,
    AttentionRefine,
    AttentionReplace,
    AttentionReweight,
    AttentionStore,
    ControlledAttnProcessor,
    ControllerGroup,
    LocalBlend,
    attention_control,
)
from nulltext.editing.edit import EditSettings, build_controller, edit
from nulltext.editing.errors import EditError
from nulltext.editing.metrics import edit_metrics
from nulltext.editing.sampling import EditOutput
from nulltext.editing.sdedit import sdedit
from nulltext.editing.tokens import align_tokens, refinement_mapper, replacement_mapper, word_positions

__all__ = [
    "AttentionController",
    "AttentionRefine",
    "AttentionReplace",
    "AttentionReweight",
    "AttentionStore",
    "ControlledAttnProcessor",
    "ControllerGroup",
    "EditError",
    "EditOutput",
    "EditSettings",
    "LocalBlend",
    "align_tokens",
    "attention_control",
    "build_controller",
    "edit",
    "edit_metrics",
    "refinement_mapper",
    "replacement_mapper",
    "sdedit",
    "word_positions",
]
