"""Prompt-to-Prompt attention control (Hertz et al., "Prompt-to-Prompt Image Editing with Cross
Attention Control", 2022) on current diffusers attention processors.

:func:`attention_control` swaps every UNet attention processor for a :class:`ControlledAttnProcessor`
(through ``unet.set_attn_processor``; ``forward`` is never patched) and restores the original
processors on exit. The processor computes the attention probabilities explicitly
(``attn.get_attention_scores``) and hands them to a controller, which sees every layer (cross and
self, ``place`` = down / mid / up) and may return replacements.

Batch layout: the classifier-free-guidance batch ``[uncond rows of every prompt; cond rows of
every prompt]`` with P prompts, row 0 of each half being the source prompt. Controllers receive
only the conditional half ([P, heads, queries, keys]) and can change only its rows 1..P-1: the
source row and the unconditional half are never edited (ALGORITHM.md section 5).

Controllers (each small, composable with :class:`ControllerGroup`; order matters, observers first):

- :class:`AttentionStore`: average maps over steps (for the attention view).
- :class:`AttentionReplace`: word swap; the source's cross-attention mapped onto the target tokens.
- :class:`AttentionRefine`: added words; aligned tokens take the source's maps, the others keep
  the target's own.
- :class:`AttentionReweight`: scale chosen words' cross-attention, alone or on top of a
  replace/refine controller (``prev``).
- :class:`LocalBlend`: a mask from the cross-attention of chosen words; outside it the latents
  are taken from the source row after every step.

The edit controllers share the injection windows: ``cross_replace`` (fraction of the steps, a
``(start, end)`` pair, or a dict word -> fraction with an optional ``"default_"`` entry) and
``self_replace`` (fraction or pair; self-attention maps with at most ``self_replace_max_tokens``
queries -- 16x16 and below, as in the official code -- are replaced by the source's).

SDXL: the same controllers, unchanged. Its UNet's attention layers are diffusers ``Attention``
modules like SD's, only more of them -- several transformer layers per block (2 at the second
level, 10 at the third in SDXL base; none at the first), each with a self- and a cross-attention --
and the processor sees every one (``place`` from its name). The cross-attention's keys are SDXL's
77 token positions: the two encoders' states are concatenated in the channels, not the tokens,
and the pooled embedding and the size/crop time ids enter the UNet through its added embedding,
not through attention (:class:`nulltext.families.StableDiffusionXL`), so each row of the edit
batch carries its own prompt's pooled embedding, and the unconditional rows the inversion's
pooled nulls. At 1024 px the maps are 64x64 and 32x32: the default local-blend resolution is 32x32
(a quarter of the latent side, as 16x16 on SD), and no self-attention map is as small as the
official 16x16 (``self_replace_max_tokens=1024`` replaces the 32x32 ones; a warning says so).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nulltext.editing.errors import EditError
from nulltext.editing.tokens import (
    context_length,
    refinement_mapper,
    replacement_mapper,
    word_positions,
)

Window = float | tuple[float, float] | Sequence[float]
CrossWindow = Window | Mapping[str, Window]
PLACES = ("down", "mid", "up")
log = logging.getLogger(__name__)
DEFAULT_WINDOW_KEYS = ("default_", "default")


def place_in_unet(processor_name: str) -> str:
    """``down_blocks.1.attentions.0...attn2.processor`` -> ``down``; likewise ``mid`` and ``up``."""
    for place, prefix in (("down", "down_blocks"), ("mid", "mid_block"), ("up", "up_blocks")):
        if processor_name.startswith(prefix):
            return place
    return "other"


# ============================================================================ controllers
class AttentionController:
    """Base controller: observes nothing and edits nothing (a no-op that still forces explicit attention).

    The sampler calls :meth:`prepare` once, then per step :meth:`begin_step`, the UNet (which calls
    the controller once per attention layer), :meth:`step_callback` on the new latents and
    :meth:`end_step`. Subclasses override :meth:`observe` (see the maps) and/or :meth:`edit`
    (return new maps for the target rows).
    """

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.num_steps = 0
        self.step = 0
        self.latent_shape: tuple[int, int] = (0, 0)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def prepare(self, prompts: Sequence[str], tokenizer, num_steps: int, latent_shape: tuple[int, int]) -> None:
        """Bind the controller to a batch of prompts (source first) and a number of sampling steps."""
        self.prompts = list(prompts)
        self.num_steps = int(num_steps)
        self.latent_shape = (int(latent_shape[0]), int(latent_shape[1]))
        self.step = 0

    def begin_step(self, step: int) -> None:
        self.step = step

    def step_callback(self, latents: Tensor) -> Tensor:
        return latents

    def end_step(self) -> None:
        pass

    def observe(self, attn: Tensor, is_cross: bool, place: str) -> None:
        """See the conditional half's maps [P, heads, queries, keys] (before this controller's edit)."""

    def edit(self, attn: Tensor, is_cross: bool, place: str) -> Tensor | None:
        """New maps [P-1, heads, queries, keys] for the target rows, or None to leave them alone."""
        return None

    def map_side(self, queries: int) -> tuple[int, int]:
        """Spatial (h, w) of a map with ``queries`` positions, from the latent shape."""
        h, w = self.latent_shape
        factor = math.sqrt(h * w / queries)
        return max(1, round(h / factor)), max(1, round(w / factor))

    def __call__(self, probs: Tensor, heads: int, is_cross: bool, place: str) -> Tensor:
        """Probabilities [rows*heads, queries, keys] of one layer -> the (possibly edited) same."""
        prompts = self.num_prompts
        rows = probs.shape[0] // heads
        if prompts == 0 or rows % prompts:
            raise EditError(f"attention batch of {rows} rows does not hold {prompts} prompts; call prepare() first")
        attn = probs.reshape(rows, heads, *probs.shape[1:])
        cond = attn[rows - prompts :]
        self.observe(cond, is_cross, place)
        if prompts > 1:
            targets = self.edit(cond, is_cross, place)
            if targets is not None:
                attn = attn.clone()
                attn[rows - prompts + 1 :] = targets.to(attn.dtype)
        return attn.reshape(probs.shape)


class ControllerGroup(AttentionController):
    """Several controllers applied in order; each sees the maps as the previous ones left them."""

    def __init__(self, *controllers: AttentionController) -> None:
        super().__init__()
        self.controllers = [c for c in controllers if c is not None]

    def prepare(self, prompts, tokenizer, num_steps, latent_shape) -> None:
        super().prepare(prompts, tokenizer, num_steps, latent_shape)
        for c in self.controllers:
            c.prepare(prompts, tokenizer, num_steps, latent_shape)

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        for c in self.controllers:
            c.begin_step(step)

    def step_callback(self, latents: Tensor) -> Tensor:
        for c in self.controllers:
            latents = c.step_callback(latents)
        return latents

    def end_step(self) -> None:
        for c in self.controllers:
            c.end_step()

    def __call__(self, probs: Tensor, heads: int, is_cross: bool, place: str) -> Tensor:
        for c in self.controllers:
            probs = c(probs, heads, is_cross, place)
        return probs

    def find(self, kind: type) -> AttentionController | None:
        """The first controller of a type, searching nested groups (e.g. the LocalBlend, for its mask)."""
        for c in self.controllers:
            found = c if isinstance(c, kind) else c.find(kind) if isinstance(c, ControllerGroup) else None
            if found is not None:
                return found
        return None


class AttentionStore(AttentionController):
    """Collects head-averaged maps of the conditional half and averages them over the steps.

    Args:
        max_queries: keep only layers with at most this many query positions (32x32 by default,
            as the official code, which skips the 64x64 layers of SD's 512 px images).
        store_self: also keep self-attention maps (queries x queries each: memory hungry).
    """

    def __init__(self, max_queries: int = 32**2, store_self: bool = False) -> None:
        super().__init__()
        self.max_queries = max_queries
        self.store_self = store_self
        self.reset()

    def reset(self) -> None:
        self.step_store: dict[str, list[Tensor]] = {}
        self.sums: dict[str, list[Tensor]] = {}
        self.num_stored_steps = 0

    def prepare(self, prompts, tokenizer, num_steps, latent_shape) -> None:
        super().prepare(prompts, tokenizer, num_steps, latent_shape)
        self.reset()

    @staticmethod
    def key(place: str, is_cross: bool) -> str:
        return f"{place}_{'cross' if is_cross else 'self'}"

    def observe(self, attn: Tensor, is_cross: bool, place: str) -> None:
        if attn.shape[2] <= self.max_queries and (is_cross or self.store_self):
            self.step_store.setdefault(self.key(place, is_cross), []).append(attn.detach().float().mean(1))

    def end_step(self) -> None:
        for key, maps in self.step_store.items():
            if key not in self.sums:
                self.sums[key] = [m.clone() for m in maps]
            else:
                for total, m in zip(self.sums[key], maps):
                    total += m
        self.step_store = {}
        self.num_stored_steps += 1

    def average(self) -> dict[str, list[Tensor]]:
        """Per key (``down_cross``, ``up_self``, ...): one [P, queries, keys] map per layer, averaged over steps."""
        n = max(self.num_stored_steps, 1)
        return {key: [m / n for m in maps] for key, maps in self.sums.items()}

    def resolutions(self, places: Sequence[str] = PLACES, is_cross: bool = True) -> list[int]:
        """The query counts of the stored layers in ``places``."""
        return sorted({m.shape[1] for place in places for m in self.sums.get(self.key(place, is_cross), [])})

    def aggregate(self, queries: int | None = None, places: Sequence[str] = ("down", "up"), is_cross: bool = True) -> Tensor:
        """[P, h, w, keys]: the step-averaged maps of the layers with ``queries`` positions, averaged over layers.

        ``queries=None`` picks, among the resolutions stored in ``places``, the one nearest a quarter
        of the latent side (16x16 for SD's 64x64 latents, as the official attention view and local
        blend use; on a small model the one nearest may exist only in the middle block).
        """
        queries = queries or pick_resolution(self.resolutions(places, is_cross), self.latent_shape)
        maps = [m for place in places for m in self.average().get(self.key(place, is_cross), []) if m.shape[1] == queries]
        if not maps:
            sides = ", ".join(str(self.map_side(q)[0]) for q in self.resolutions(places, is_cross))
            raise EditError(
                f"resolution {self.map_side(queries)[0]}: no {'cross' if is_cross else 'self'}-attention maps of that side "
                f"in {', '.join(places)}; this model has {sides}"
            )
        mean = torch.stack(maps).mean(0)
        h, w = self.map_side(queries)
        return mean.reshape(mean.shape[0], h, w, mean.shape[-1])


def pick_resolution(query_counts: Sequence[int], latent_shape: tuple[int, int]) -> int:
    """The query count whose map side is nearest a quarter of the latent side (ties: the larger map)."""
    if not query_counts:
        raise EditError("no cross-attention maps were recorded")
    goal = math.sqrt(latent_shape[0] * latent_shape[1]) / 4
    return min(query_counts, key=lambda q: (abs(math.sqrt(q) - goal), -q))


def step_window(bounds: Window, num_steps: int, what: str) -> tuple[int, int]:
    """A fraction f -> steps [0, int(f*S)); a pair (a, b) -> [int(a*S), int(b*S)) (official convention)."""
    if isinstance(bounds, (int, float)):
        bounds = (0.0, float(bounds))
    bounds = tuple(float(b) for b in bounds)
    if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
        raise EditError(f"{what} must be a fraction in [0, 1] or a pair 0 <= start <= end <= 1, not {bounds}")
    return int(bounds[0] * num_steps), int(bounds[1] * num_steps)


def cross_replace_alphas(tokenizer, prompts: Sequence[str], num_steps: int, cross_replace: CrossWindow) -> Tensor:
    """[S, P-1, L]: 1 where a target token's cross-attention is injected at a step, else 0.

    A dict maps target-prompt words to their own windows; other tokens use ``"default_"`` (the
    whole run, (0, 1), when absent -- the official default).
    """
    length = context_length(tokenizer)
    windows = dict(cross_replace) if isinstance(cross_replace, Mapping) else {"default_": cross_replace}
    default = next((windows.pop(k) for k in DEFAULT_WINDOW_KEYS if k in windows), (0.0, 1.0))
    alphas = torch.zeros(num_steps, len(prompts) - 1, length)
    start, end = step_window(default, num_steps, "cross_replace")
    alphas[start:end] = 1.0
    for word, bounds in windows.items():
        start, end = step_window(bounds, num_steps, f"cross_replace[{word!r}]")
        found = False
        for p, prompt in enumerate(prompts[1:]):
            positions = word_positions(tokenizer, prompt, word)
            if positions:
                found = True
                alphas[:, p, positions] = 0.0
                alphas[start:end, p, positions] = 1.0
        if not found:
            raise EditError(f"cross_replace: word {word!r} is in none of the target prompts {list(prompts[1:])}")
    return alphas


class AttentionEdit(AttentionController):
    """Shared logic of the edit controllers: injection windows for cross- and self-attention.

    Inside the cross window a target token's map is ``replace_cross(source, target)``, outside it
    the target's own; inside the self window (small maps only) the target rows take the source's
    self-attention.
    """

    def __init__(self, cross_replace: CrossWindow = 0.8, self_replace: Window | None = 0.4, self_replace_max_tokens: int = 16**2) -> None:
        super().__init__()
        self.cross_replace = cross_replace
        self.self_replace = self_replace
        self.self_replace_max_tokens = self_replace_max_tokens

    def prepare(self, prompts, tokenizer, num_steps, latent_shape) -> None:
        super().prepare(prompts, tokenizer, num_steps, latent_shape)
        self.cross_alphas = cross_replace_alphas(tokenizer, self.prompts, num_steps, self.cross_replace)
        self.self_window = (0, 0) if self.self_replace is None else step_window(self.self_replace, num_steps, "self_replace")
        self.self_map_queries: set[int] = set()

    def warn_if_no_self_map_was_replaced(self) -> None:
        """One warning line when the self window is open but every self-attention map was larger than
        ``self_replace_max_tokens``: SDXL at 1024 px has no map of 16x16 or smaller (its smallest are
        32x32, a quarter of its 128x128 latents as 16x16 is of SD's 64x64)."""
        start, end = self.self_window
        if start < end and self.self_map_queries and min(self.self_map_queries) > self.self_replace_max_tokens:
            side = self.map_side(min(self.self_map_queries))
            log.warning(
                "self_replace: no self-attention map was replaced: the smallest has %dx%d = %d queries, more than "
                "self_replace_max_tokens=%d; set self_replace_max_tokens=%d to replace the maps of that size",
                side[0], side[1], min(self.self_map_queries), self.self_replace_max_tokens, min(self.self_map_queries),
            )

    def replace_cross(self, base: Tensor, target: Tensor) -> Tensor:
        """The injected maps [P-1, heads, queries, keys] from the source's ``base`` [heads, queries, keys]."""
        raise NotImplementedError

    def edit(self, attn: Tensor, is_cross: bool, place: str) -> Tensor | None:
        base, target = attn[0], attn[1:]
        if is_cross:
            alpha = self.cross_alphas[self.step].to(target)[:, None, None, :]  # [P-1, 1, 1, keys]
            if not alpha.any():
                return None
            return alpha * self.replace_cross(base, target) + (1 - alpha) * target
        self.self_map_queries.add(attn.shape[2])
        start, end = self.self_window
        if start <= self.step < end and attn.shape[2] <= self.self_replace_max_tokens:
            return base.unsqueeze(0).expand_as(target)
        return None


class AttentionReplace(AttentionEdit):
    """Word swap (same number of words): ``target = source @ M`` with M from :func:`replacement_mapper`."""

    def prepare(self, prompts, tokenizer, num_steps, latent_shape) -> None:
        super().prepare(prompts, tokenizer, num_steps, latent_shape)
        self.mapper = torch.stack([replacement_mapper(tokenizer, self.prompts[0], p) for p in self.prompts[1:]])

    def replace_cross(self, base: Tensor, target: Tensor) -> Tensor:
        return torch.einsum("hqk,pkn->phqn", base, self.mapper.to(base))


class AttentionRefine(AttentionEdit):
    """Added or changed words: aligned target tokens take the source's maps, the rest keep their own."""

    def prepare(self, prompts, tokenizer, num_steps, latent_shape) -> None:
        super().prepare(prompts, tokenizer, num_steps, latent_shape)
        pairs = [refinement_mapper(tokenizer, self.prompts[0], p) for p in self.prompts[1:]]
        self.mapper = torch.stack([m for m, _ in pairs])  # [P-1, L]
        self.aligned = torch.stack([a for _, a in pairs])[:, None, None, :]  # [P-1, 1, 1, L]

    def replace_cross(self, base: Tensor, target: Tensor) -> Tensor:
        mapped = base[:, :, self.mapper.to(base.device)].permute(2, 0, 1, 3)  # [P-1, heads, queries, L]
        aligned = self.aligned.to(target)
        return mapped * aligned + target * (1 - aligned)


class AttentionReweight(AttentionEdit):
    """Scale the cross-attention of chosen target words by a factor (``{word: factor}``).

    Alone it scales the target rows' own maps (so factor 1 is exactly a no-op); with ``prev`` (an
    :class:`AttentionReplace` or :class:`AttentionRefine`) it scales that controller's injected
    maps. The scaling is active inside the cross window.
    """

    def __init__(
        self,
        weights: Mapping[str | int, float],
        prev: AttentionEdit | None = None,
        cross_replace: CrossWindow = 0.8,
        self_replace: Window | None = 0.4,
        self_replace_max_tokens: int = 16**2,
    ) -> None:
        super().__init__(cross_replace, self_replace, self_replace_max_tokens)
        if not weights:
            raise EditError("reweight needs at least one {word: factor}")
        self.weights = {w: float(f) for w, f in weights.items()}
        self.prev = prev

    def prepare(self, prompts, tokenizer, num_steps, latent_shape) -> None:
        super().prepare(prompts, tokenizer, num_steps, latent_shape)
        if self.prev is not None:
            self.prev.prepare(prompts, tokenizer, num_steps, latent_shape)
        self.equalizer = torch.ones(len(self.prompts) - 1, context_length(tokenizer))
        for word, factor in self.weights.items():
            hits = [word_positions(tokenizer, p, word) for p in self.prompts[1:]]
            if not any(hits):
                raise EditError(f"reweight: word {word!r} is in none of the target prompts {self.prompts[1:]}")
            for p, positions in enumerate(hits):
                self.equalizer[p, positions] = factor

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        if self.prev is not None:
            self.prev.begin_step(step)

    def replace_cross(self, base: Tensor, target: Tensor) -> Tensor:
        if self.prev is not None:
            target = self.prev.replace_cross(base, target)
        return target * self.equalizer.to(target)[:, None, None, :]


class LocalBlend(AttentionController):
    """Keep the source's latents outside the region of chosen words (official null-text notebook version).

    Per step, the cross-attention maps of the chosen resolution (the one nearest a quarter of
    the latent side: 16x16 on SD) from ``places`` are averaged over heads and layers and summed
    over the steps so far; a prompt's word map is the sum over its words' tokens, max-pooled
    (3x3), resized to the latent size, divided by its maximum and thresholded. The mask of a target
    row is the union of its own and the source's; from step ``int(start * S)`` on, the latents
    become ``source + mask * (latents - source)``.

    Args:
        words: one entry per prompt (a word or a list of words), or two entries
            ``[source_word(s), target_word(s)]`` applied to every target, or one word for all.
        threshold: on the max-normalised map (0.3 in the official code).
        start: fraction of the steps before blending starts (0.2).
        queries: the maps to use (side squared); None: :func:`pick_resolution`'s choice.
    """

    def __init__(
        self,
        words: str | Sequence[str | Sequence[str]],
        threshold: float = 0.3,
        start: float = 0.2,
        places: Sequence[str] = ("down", "up"),
        queries: int | None = None,
    ) -> None:
        super().__init__()
        self.words = words
        self.threshold = float(threshold)
        self.start = float(start)
        self.places = tuple(places)
        self.queries = queries
        self.mask: Tensor | None = None

    def _words_per_prompt(self) -> list[list[str]]:
        words = self.words
        if isinstance(words, str):
            per_prompt = [words] * self.num_prompts
        else:
            words = list(words)
            if len(words) == self.num_prompts:
                per_prompt = words
            elif len(words) == 2:
                per_prompt = [words[0]] + [words[1]] * (self.num_prompts - 1)
            elif len(words) == 1:
                per_prompt = words * self.num_prompts
            else:
                raise EditError(
                    f"blend_words needs one entry per prompt ({self.num_prompts}) or [source, target], got {len(words)}"
                )
        return [[w] if isinstance(w, str) else list(w) for w in per_prompt]

    def prepare(self, prompts, tokenizer, num_steps, latent_shape) -> None:
        super().prepare(prompts, tokenizer, num_steps, latent_shape)
        self.word_weights = torch.zeros(self.num_prompts, context_length(tokenizer))
        for p, (prompt, words) in enumerate(zip(self.prompts, self._words_per_prompt())):
            positions = [i for word in words for i in word_positions(tokenizer, prompt, word)]
            if not positions:
                raise EditError(f"blend_words: none of {words} is in the prompt {prompt!r}")
            self.word_weights[p, positions] = 1.0
        self.start_step = int(self.start * num_steps)
        self.sums: dict[int, Tensor] = {}
        self.current: dict[int, list[Tensor]] = {}
        self.mask = None

    def observe(self, attn: Tensor, is_cross: bool, place: str) -> None:
        if is_cross and place in self.places:
            self.current.setdefault(attn.shape[2], []).append(attn.detach().float().mean(1))

    def compute_mask(self) -> Tensor:
        """[P, 1, h, w] float {0, 1} latent mask from the maps summed so far (row 0 = source's own)."""
        queries = self.queries or pick_resolution(list(self.sums), self.latent_shape)
        if queries not in self.sums:
            sides = sorted(self.map_side(q)[0] for q in self.sums)
            raise EditError(f"blend_resolution {self.map_side(queries)[0]}: no cross-attention maps of that side; this model has {sides}")
        maps = self.sums[queries]  # [P, queries, keys]
        h, w = self.map_side(queries)
        word_maps = (maps * self.word_weights.to(maps)[:, None, :]).sum(-1).reshape(-1, 1, h, w)
        word_maps = F.max_pool2d(word_maps, kernel_size=3, stride=1, padding=1)
        word_maps = F.interpolate(word_maps, size=self.latent_shape)
        peak = word_maps.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(word_maps.dtype).tiny)
        mask = (word_maps / peak).gt(self.threshold)
        return (mask[:1] | mask).float()

    def step_callback(self, latents: Tensor) -> Tensor:
        for queries, maps in self.current.items():
            step_mean = torch.stack(maps).mean(0)
            self.sums[queries] = self.sums[queries] + step_mean if queries in self.sums else step_mean
        self.current = {}
        if self.step < self.start_step or latents.shape[0] < 2:
            return latents
        self.mask = self.compute_mask().to(latents)
        source = latents[:1]
        blended = source + self.mask * (latents - source)
        return torch.cat([latents[:1], blended[1:]])


# ============================================================================ processor
class ControlledAttnProcessor:
    """diffusers' ``AttnProcessor`` with explicit probabilities routed through a controller.

    With ``controller=None`` it computes what the default processors compute (explicit softmax
    instead of SDPA: equal within float rounding).
    """

    def __init__(self, controller: AttentionController | None, place: str, name: str = "") -> None:
        self.controller = controller
        self.place = place
        self.name = name

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.controller is not None:
            probs = self.controller(probs, attn.heads, is_cross, self.place)

        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attention_control(unet, controller: AttentionController | None) -> Iterator[AttentionController | None]:
    """Route every attention layer of ``unet`` through ``controller``; restore the original processors after."""
    original = unet.attn_processors
    unet.set_attn_processor(
        {name: ControlledAttnProcessor(controller, place_in_unet(name), name) for name in original}
    )
    try:
        yield controller
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it is given
