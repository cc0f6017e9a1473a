"""Token positions of words, and the token mappers of Prompt-to-Prompt (Hertz et al. 2022).

Everything indexes the text encoder's input sequence with the pipeline's real tokenizer (CLIP BPE
for Stable Diffusion; SDXL's two tokenizers split prompts alike, :func:`context_tokenizer`): position 0 is ``<|startoftext|>``, a word may cover several positions
("astronaut's" is two tokens, "résumé" three), the last real position is ``<|endoftext|>`` and
the rest up to the context length (77) is padding.

Words are the whitespace-separated pieces of a prompt. CLIP's tokenizer never merges across
whitespace, so tokenizing each word alone and concatenating gives the prompt's own token ids;
:func:`word_spans` checks that and refuses tokenizers for which it does not hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from nulltext.editing.errors import EditError

_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")


def normalize_word(word: str) -> str:
    """Case and edge punctuation do not matter when a word is named: ``"Car."`` matches ``car``."""
    return _EDGE_PUNCTUATION.sub("", word.lower())


def context_length(tokenizer) -> int:
    return int(tokenizer.model_max_length)


def context_tokenizer(pipe, prompts: Sequence[str]):
    """The tokenizer whose positions are the positions of the cross-attention's keys, for ``prompts``.

    SD has one. SDXL puts its two encoders' states side by side in the channels (CLIP-L's 768 then
    CLIP-G's 1280, 77 positions: ``nulltext.families.StableDiffusionXL.encode_text``), so key k is
    token k of both, and one tokenizer's word positions hold for the maps only when both split every
    prompt alike. SDXL base's do (the same CLIP BPE; only their padding differs, ``<|endoftext|>``
    and ``!``, and padding maps to padding in order): checked here, as another pipeline could pair
    other tokenizers.
    """
    tokenizer, second = pipe.tokenizer, getattr(pipe, "tokenizer_2", None)
    if second is not None:
        for prompt in prompts:
            if prompt_token_ids(second, prompt) != prompt_token_ids(tokenizer, prompt):
                raise EditError(
                    f"the two text encoders' tokenizers split {prompt!r} differently; Prompt-to-Prompt needs one token "
                    "position per key of the cross-attention (SDXL base's two CLIP tokenizers agree)"
                )
    return tokenizer


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids with start and end tokens, truncated to the context length, without padding."""
    return list(tokenizer(prompt, truncation=True, max_length=context_length(tokenizer)).input_ids)


def token_texts(tokenizer, prompt: str) -> list[str]:
    """The text of every real token of ``prompt`` (start and end tokens included), for labels."""
    return [tokenizer.decode([i]) for i in prompt_token_ids(tokenizer, prompt)]


@dataclass(frozen=True)
class WordSpan:
    word: str
    positions: tuple[int, ...]  # token positions in the encoder input (start token = position 0)


def word_spans(tokenizer, prompt: str) -> list[WordSpan]:
    """The token positions of every whitespace-separated word of ``prompt``.

    Words whose tokens fall past the context length (truncated prompts) get the positions that
    survive, possibly none.
    """
    words = prompt.split()
    pieces = [list(tokenizer(w, add_special_tokens=False).input_ids) for w in words]
    full = list(tokenizer(prompt).input_ids)
    if full[1:-1] != [i for p in pieces for i in p]:
        raise EditError(
            f"the tokenizer merges tokens across words in {prompt!r}; word positions cannot be found "
            "(Prompt-to-Prompt needs a whitespace-respecting tokenizer such as CLIP's)"
        )
    last = context_length(tokenizer) - 1  # the end token always keeps the last position
    spans, position = [], 1
    for word, ids in zip(words, pieces):
        spans.append(WordSpan(word, tuple(p for p in range(position, position + len(ids)) if p < last)))
        position += len(ids)
    return spans


def word_positions(tokenizer, prompt: str, word: str | int) -> list[int]:
    """Token positions of every occurrence of ``word`` in ``prompt`` (empty if absent).

    ``word`` may be a word index (int), a word, or several words ("red car") matched as a
    consecutive phrase; matching ignores case and punctuation at the edges of words.
    """
    spans = word_spans(tokenizer, prompt)
    if isinstance(word, int):
        return list(spans[word].positions) if -len(spans) <= word < len(spans) else []
    wanted = [normalize_word(w) for w in str(word).split()]
    wanted = [w for w in wanted if w]
    if not wanted:
        return []
    names = [normalize_word(s.word) for s in spans]
    out: list[int] = []
    for start in range(len(spans) - len(wanted) + 1):
        if names[start : start + len(wanted)] == wanted:
            for span in spans[start : start + len(wanted)]:
                out.extend(p for p in span.positions if p not in out)
    return out


# -- word replacement -------------------------------------------------------------------------
def replacement_mapper(tokenizer, source: str, target: str) -> Tensor:
    """``M`` [L, L] with ``target_attention = source_attention @ M`` for a word-swap edit.

    Source and target must have the same number of words. Unchanged words map token to token;
    a swapped word whose token count equals the source word's maps one to one, otherwise every
    target token of it receives the source word's total attention divided by its token count (as
    the official code does). The start token, the end token and the padding map in order.
    """
    length = context_length(tokenizer)
    src, tgt = word_spans(tokenizer, source), word_spans(tokenizer, target)
    if len(src) != len(tgt):
        raise EditError(
            f"word replacement needs prompts with the same number of words: {source!r} has {len(src)}, "
            f"{target!r} has {len(tgt)}; use mode=refine for added or removed words"
        )
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1  # start token
    i = j = 1
    for s, t in zip(src, tgt):
        if not s.positions or not t.positions:
            break  # truncated
        if len(s.positions) == len(t.positions):
            mapper[list(s.positions), list(t.positions)] = 1
        else:
            for tj in t.positions:
                mapper[list(s.positions), tj] = 1 / len(t.positions)
        i, j = s.positions[-1] + 1, t.positions[-1] + 1
    while i < length and j < length:  # end token, then padding, in order
        mapper[i, j] = 1
        i += 1
        j += 1
    return mapper


# -- refinement (added words) -----------------------------------------------------------------
def align_tokens(source: list[int], target: list[int]) -> list[int | None]:
    """Global alignment (Needleman-Wunsch: match +1, mismatch -1, gap 0) of two token sequences.

    Returns, for every target position, the aligned source position or None (a target token
    with no counterpart: an added or changed word). With these scores the alignment is a longest
    common subsequence; among equal ones, matches are taken as late as possible.
    """
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for a in range(1, n + 1):
        for b in range(1, m + 1):
            diagonal = score[a - 1][b - 1] + (1 if source[a - 1] == target[b - 1] else -1)
            score[a][b] = max(diagonal, score[a - 1][b], score[a][b - 1])
    mapping: list[int | None] = [None] * m
    a, b = n, m
    while a > 0 and b > 0:
        if source[a - 1] == target[b - 1] and score[a][b] == score[a - 1][b - 1] + 1:
            mapping[b - 1] = a - 1
            a, b = a - 1, b - 1
        elif score[a][b] == score[a][b - 1]:
            b -= 1
        else:
            a -= 1
    return mapping


def refinement_mapper(tokenizer, source: str, target: str) -> tuple[Tensor, Tensor]:
    """``(mapper [L] long, aligned [L] float)`` for a refinement edit (added/changed words).

    Target position j takes the source's attention column ``mapper[j]`` where ``aligned[j]`` is 1
    and keeps its own where it is 0. Real tokens (start and end included) are aligned with
    :func:`align_tokens`; padding maps to the source's padding in order (the last position when the
    source has fewer padding positions).
    """
    length = context_length(tokenizer)
    src, tgt = prompt_token_ids(tokenizer, source), prompt_token_ids(tokenizer, target)
    mapping = align_tokens(src, tgt)
    mapper = torch.zeros(length, dtype=torch.long)
    aligned = torch.ones(length)
    for j, i in enumerate(mapping):
        mapper[j] = 0 if i is None else i
        aligned[j] = 0.0 if i is None else 1.0
    for j in range(len(tgt), length):
        mapper[j] = min(len(src) + j - len(tgt), length - 1)
    return mapper, aligned
