"""Token grounding for the pocket training: TokenCompose's token loss (Wang et al., "TokenCompose:
Text-to-Image Diffusion with Token-level Supervision", CVPR 2024, eq. 2).

    L_token = mean over (layer, sample, grounded token k) of (1 - sum_{q in M_k} A[q,k] / sum_q A[q,k])^2

``A`` is a cross-attention layer's probabilities averaged over its heads, ``[queries, keys]``, kept
with their gradients by :func:`recording_cross_attention` (training only: it installs an
explicit-softmax copy of diffusers' ``AttnProcessor`` through ``unet.set_attn_processor`` and puts
the UNet's own processors back on exit, so an exported model has the default processors and loads
with the stock ``StableDiffusionPipeline``). ``M_k`` is the set of map cells of token ``k``'s
region: for each object, its size, colour, shape and position words on the object's mask (the
renderer's exact coverage, :func:`nulltext.scenes.object_coverage`, area-pooled to the map side; a
cell counts above ``cell_threshold`` coverage and each object's most covered cell always counts);
the background phrase's words on the cells outside every object. Captions dropped for
classifier-free guidance are not grounded. Token positions follow from the caption template
(:class:`CaptionPositions`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nulltext.editing.attention import AttentionController, ControlledAttnProcessor, place_in_unet
from nulltext.scenes import MAX_OBJECTS, LayoutTokenizer, SceneLayout


class CrossAttentionRecorder(AttentionController):
    """Keeps every cross-attention layer's head-averaged probabilities ``[batch, queries, keys]``,
    with their gradients, and its place in the UNet, in call order; the probabilities pass through
    unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[Tensor] = []
        self.places: list[str] = []

    def __call__(self, probs: Tensor, heads: int, is_cross: bool, place: str) -> Tensor:
        if is_cross:
            self.maps.append(probs.reshape(-1, heads, *probs.shape[1:]).mean(1))
            self.places.append(place)
        return probs

    def maps_in(self, places: Sequence[str]) -> list[Tensor]:
        """The recorded maps of the layers in ``places``."""
        return [m for m, p in zip(self.maps, self.places) if p in places]


@contextmanager
def recording_cross_attention(unet, places: Sequence[str] = ("down", "up")) -> Iterator[CrossAttentionRecorder]:
    """Record the cross-attention (``attn2``) maps of ``unet``'s blocks in ``places`` (``down``, ``mid``,
    ``up``) during the ``with`` body; every other processor stays as it is; all restored on exit."""
    recorder = CrossAttentionRecorder()
    original = unet.attn_processors
    unet.set_attn_processor({
        name: ControlledAttnProcessor(recorder, place_in_unet(name), name)
        if name.endswith("attn2.processor") and place_in_unet(name) in places else processor
        for name, processor in original.items()
    })
    try:
        yield recorder
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it is given


class CaptionPositions:
    """Token positions of the words of template captions, from :class:`~nulltext.scenes.LayoutTokenizer`'s tables.

    A caption is BOS, object phrases joined by one token each ("," / "and"), the background tail
    (" on a <background noun>", or "a <background noun>" without objects), EOS, padding. Every
    object phrase ("a large red circle on the left") is one token per word, so object ``j`` starts
    at ``1 + j * (phrase + join)`` and its size, colour, shape and position words sit at offsets 1,
    2, 3 and the last; the background noun's tokens ("plain pink background", "checkered pink
    background") follow "on a" / "a".
    """

    OBJECT_WORDS = (1, 2, 3, -1)  # size, colour, shape, the position noun ("left", "center", ...)

    def __init__(self, tokens: LayoutTokenizer):
        phrase_lengths, join_lengths = tokens.phrases[1], tokens.joins[1]
        if phrase_lengths.unique().numel() != 1 or join_lengths.unique().numel() != 1:
            raise ValueError("object phrases (and joins) must all have the same number of tokens")
        self.phrase = int(phrase_lengths[0])
        self.stride = self.phrase + int(join_lengths[0])
        self.tail_lengths, self.lone_lengths = tokens.tails[1], tokens.lone_backgrounds[1]
        self.eos = tokens.eos

    def object_words(self, layout: SceneLayout) -> Tensor:
        """int64 ``[n, MAX_OBJECTS, 4]``: positions of each object slot's size, colour, shape and position word."""
        offsets = torch.tensor([o % self.phrase for o in self.OBJECT_WORDS])
        starts = 1 + torch.arange(MAX_OBJECTS) * self.stride
        return (starts[:, None] + offsets[None]).expand(len(layout), -1, -1)

    def background_words(self, layout: SceneLayout) -> tuple[Tensor, Tensor]:
        """int64 ``[n]`` start and end (exclusive) of each caption's background noun."""
        codes, count = layout.background_codes, layout.count
        tail_start = count * self.stride - (self.stride - self.phrase) + 1  # after the last object phrase
        start = torch.where(count > 0, tail_start + 2, torch.full_like(count, 2))  # after "on a" / BOS "a"
        length = torch.where(count > 0, self.tail_lengths[codes] - 2, self.lone_lengths[codes] - 1)
        return start, start + length


def cell_masks(coverage: Tensor, valid: Tensor, side: int, threshold: float) -> tuple[Tensor, Tensor]:
    """Objects' and background's map cells at ``side`` x ``side``: bool ``[n, MAX_OBJECTS, side*side]``
    (unused slots empty) and ``[n, side*side]`` (the cells of no object).

    ``coverage`` ``[n, MAX_OBJECTS, R, R]`` is area-pooled to the map; a cell is an object's above
    ``threshold`` coverage, and each object's most covered cell always is (a small object on a
    coarse map still has one)."""
    pooled = F.adaptive_avg_pool2d(coverage, side).flatten(2)  # exact area pooling: R is a multiple of side
    cells = pooled > threshold
    cells.scatter_(2, pooled.argmax(2, keepdim=True), True)
    cells &= valid.to(cells.device)[..., None]
    return cells, ~cells.any(1)


class GroundingTargets:
    """What each key position of a batch's captions is grounded on, at every map side.

    ``keys``: how many leading key positions can be grounded (the rest never are). Built once per
    batch; :meth:`masks` computes (and caches) the cells of one map side."""

    def __init__(self, positions: CaptionPositions, layout: SceneLayout, coverage: Tensor, dropped: Tensor, threshold: float):
        device = coverage.device
        words = positions.object_words(layout)  # [n, 3, 4]
        start, end = positions.background_words(layout)
        self.keys = int(max(words.max() + 1, end.max()))
        n, keys = len(layout), torch.arange(self.keys)
        object_tokens = torch.zeros(n, MAX_OBJECTS, self.keys, dtype=torch.bool)
        object_tokens.scatter_(2, words, True)
        self.object_tokens = (object_tokens & layout.valid[..., None]).to(device)  # [n, 3, K]
        self.background_tokens = ((keys >= start[:, None]) & (keys < end[:, None])).to(device)  # [n, K]
        kept = ~dropped.to(device)[:, None]
        self.grounded = (self.object_tokens.any(1) | self.background_tokens) & kept  # [n, K]
        self.coverage, self.valid, self.threshold = coverage, layout.valid, threshold
        self._masks: dict[int, Tensor] = {}

    def masks(self, side: int) -> Tensor:
        """float ``[n, K, side*side]``: 1 on the cells of each grounded token (0 rows for the others)."""
        if side not in self._masks:
            objects, background = cell_masks(self.coverage, self.valid, side, self.threshold)
            m = torch.einsum("bjk,bjq->bkq", self.object_tokens.float(), objects.float())
            m = m + self.background_tokens.float()[..., None] * background.float()[:, None]
            self._masks[side] = m.clamp_(max=1.0) * self.grounded.float()[..., None]
        return self._masks[side]


def token_shares(attention: Tensor, masks: Tensor) -> Tensor:
    """``[n, K]``: the share of each key's attention mass (over the queries) that falls on its cells.

    ``attention`` ``[n, queries, keys >= K]`` (rows sum to 1 over the keys), ``masks`` ``[n, K, queries]``."""
    a = attention[..., : masks.shape[1]].float()
    inside = torch.einsum("bqk,bkq->bk", a, masks)
    return inside / a.sum(1).clamp_min(torch.finfo(a.dtype).tiny)


def token_loss(maps: Sequence[Tensor], targets: GroundingTargets) -> Tensor:
    """TokenCompose's L_token over recorded maps (each ``[n, queries, keys]``, square maps); 0 when
    no token of the batch is grounded (every caption dropped)."""
    grounded = targets.grounded.float()
    count = grounded.sum()
    losses = []
    for attention in maps:
        side = math.isqrt(attention.shape[1])
        shares = token_shares(attention, targets.masks(side))
        losses.append(((1 - shares) ** 2 * grounded).sum() / count.clamp_min(1))
    return torch.stack(losses).mean()
