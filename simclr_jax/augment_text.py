"""CLEAR's sentence augmentations on token ids (Wu et al. 2020, arXiv 2012.15466), BERT's MLM mask.

Pure functions on one example, `f(key, tokens [L], words [L], ...) -> (tokens [L], words [L])`:
`tokens` is `[CLS] t1..tk [SEP] [PAD]...`, `words[j]` the index (0, 1, ...) of the word token j
belongs to (a word may be several subword tokens), -1 for [CLS], [SEP] and pads. Every result is
re-packed to the same form and length (kept tokens in order, [SEP] after the last, pads after),
with its words renumbered 0, 1, ..., so augmentations compose; all are jittable and vmappable.

CLEAR's four augmentations (its abstract: "word and span deletion, reordering, and
substitution"; the names are its results tables': del-word, del-span, reorder, subs):
- `word_deletion`: a `ratio` of the words, each replaced by one [DEL] token;
- `span_deletion`: one span of consecutive words covering ~`ratio` of them, replaced by one [DEL];
- `reordering`: two non-overlapping spans of words (together ~`ratio` of them) swap places;
- `synonym_substitution`: ~`ratio` of the words that are one token with a listed synonym take
  one of them at random (a user-supplied table: `synonym_table`).
The exact counts (`round(ratio * words)`, at least one word kept by the deletions), one swapped
pair of equal-length spans, and [DEL] per deleted word are our reading; the paper's text was not
reachable here to check them (docs/methods.md, CLEAR).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Special token ids. They must equal simclr_jax.data.tokenizer's (a pure module may not import
# data): PAD=0, UNK=1, CLS=2, SEP=3, MASK=4, DEL=5; ids >= NUM_SPECIAL are ordinary tokens.
PAD, UNK, CLS, SEP, MASK, DEL = 0, 1, 2, 3, 4, 5
NUM_SPECIAL = 6

Example = tuple[jax.Array, jax.Array]  # (tokens [L], words [L])


def _word_starts(words: jax.Array) -> jax.Array:
    """`[L]` bool: the first token of each word."""
    prev = jnp.concatenate([jnp.full((1,), -1, words.dtype), words[:-1]])
    return (words >= 0) & (words != prev)


def _num_words(words: jax.Array) -> jax.Array:
    """The number of words of the example (int32 scalar)."""
    return jnp.sum(_word_starts(words)).astype(jnp.int32)


def _count(ratio: float, n: jax.Array) -> jax.Array:
    """`round(ratio * n)` words (int32), computed in float32."""
    return jnp.round(ratio * n.astype(jnp.float32)).astype(jnp.int32)


def _repack(tokens: jax.Array, words: jax.Array, keep: jax.Array) -> Example:
    """The kept tokens moved to the front in order, pads after; words renumbered 0, 1, ..."""
    length = tokens.shape[0]
    keep = keep & (tokens != PAD)
    new_word = jnp.cumsum(_word_starts(words) & keep) - 1
    words = jnp.where(words >= 0, new_word, -1).astype(words.dtype)
    dest = jnp.where(keep, jnp.cumsum(keep) - 1, length)  # dropped tokens go nowhere
    out_t = jnp.full_like(tokens, PAD).at[dest].set(tokens, mode="drop")
    out_w = jnp.full_like(words, -1).at[dest].set(words, mode="drop")
    return out_t, out_w


def _delete_words(
    tokens: jax.Array, words: jax.Array, deleted: jax.Array, marker: jax.Array
) -> Example:
    """Drops the tokens of the words where `deleted[word]`; tokens where `marker` become [DEL]."""
    gone = (words >= 0) & deleted[jnp.maximum(words, 0)]
    tokens = jnp.where(marker, DEL, tokens)
    return _repack(tokens, words, ~gone | marker)


def _random_rank(key: jax.Array, n: jax.Array, length: int) -> jax.Array:
    """A uniformly random rank 0..n-1 for each of the first `n` of `length` slots (others >= n)."""
    scores = jax.random.uniform(key, (length,))
    scores = jnp.where(jnp.arange(length) < n, scores, 2.0)
    return jnp.argsort(jnp.argsort(scores))


def word_deletion(key: jax.Array, tokens: jax.Array, words: jax.Array, ratio: float) -> Example:
    """`round(ratio * words)` random words (at most all but one) each replaced by one [DEL]."""
    n = _num_words(words)
    k = jnp.minimum(_count(ratio, n), jnp.maximum(n - 1, 0))
    deleted = _random_rank(key, n, tokens.shape[0]) < k
    marker = _word_starts(words) & deleted[jnp.maximum(words, 0)]
    return _delete_words(tokens, words, deleted, marker)


def span_deletion(key: jax.Array, tokens: jax.Array, words: jax.Array, ratio: float) -> Example:
    """One random span of `round(ratio * words)` words (at most all but one) -> one [DEL]."""
    n = _num_words(words)
    k = jnp.minimum(_count(ratio, n), jnp.maximum(n - 1, 0))
    start = jax.random.randint(key, (), 0, jnp.maximum(n - k + 1, 1))
    ids = jnp.arange(tokens.shape[0])
    deleted = (ids >= start) & (ids < start + k)
    marker = _word_starts(words) & (words == start) & (k > 0)
    return _delete_words(tokens, words, deleted, marker)


def reordering(key: jax.Array, tokens: jax.Array, words: jax.Array, ratio: float) -> Example:
    """Two non-overlapping spans of `m = round(ratio * words / 2)` words each swap places.

    `m` is at most half the words; 0 (ratio 0, or one word) leaves the example as it is. The
    two starts are uniform over the valid pairs; subword tokens keep their order in the word.
    """
    length = tokens.shape[0]
    n = _num_words(words)
    m = jnp.minimum(_count(ratio / 2, n), n // 2)
    slots = jnp.maximum(n - 2 * m + 2, 2)  # a < b with b >= a + m: starts x < y among `slots`
    kx, ky = jax.random.split(key)
    x = jax.random.randint(kx, (), 0, slots)
    y = jax.random.randint(ky, (), 0, slots - 1)
    y = jnp.where(y >= x, y + 1, y)
    a, b = jnp.minimum(x, y), jnp.maximum(x, y) + m - 1
    in_a = (words >= a) & (words < a + m)
    in_b = (words >= b) & (words < b + m)
    pos = jnp.where(in_a, words + (b - a), jnp.where(in_b, words - (b - a), words))
    # Sort key: [CLS] first, words by their new position, then [SEP], then pads (stable in j).
    special = jnp.where(tokens == CLS, -1, jnp.where(tokens == PAD, n + 1, n))
    rank = jnp.where(words >= 0, pos, special)
    order = jnp.argsort(rank * length + jnp.arange(length))
    return tokens[order], jnp.where(words >= 0, pos, -1)[order].astype(words.dtype)


def synonym_substitution(
    key: jax.Array, tokens: jax.Array, words: jax.Array, table: jax.Array, ratio: float
) -> Example:
    """Up to `round(ratio * words)` one-token words with synonyms take a random listed one.

    `table`: int32 `[V, S]`, row t the synonym ids of token t, -1 after the last (`synonym_table`).
    A word of several subword tokens, or one without synonyms, is never substituted.
    """
    length = tokens.shape[0]
    k_pick, k_syn = jax.random.split(key)
    starts = _word_starts(words)
    nxt = jnp.concatenate([words[1:], jnp.full((1,), -1, words.dtype)])
    rows = jnp.take(table, tokens, axis=0, mode="clip")  # [L, S]
    num_syn = jnp.sum(rows >= 0, axis=1)
    eligible = starts & (nxt != words) & (num_syn > 0) & (tokens < table.shape[0])
    scores = jnp.where(eligible, jax.random.uniform(k_pick, (length,)), 2.0)
    chosen = eligible & (jnp.argsort(jnp.argsort(scores)) < _count(ratio, _num_words(words)))
    pick = jnp.floor(jax.random.uniform(k_syn, (length,)) * num_syn).astype(jnp.int32)
    pick = jnp.clip(pick, 0, jnp.maximum(num_syn - 1, 0))
    synonym = jnp.take_along_axis(rows, pick[:, None], axis=1)[:, 0]
    return jnp.where(chosen, synonym, tokens).astype(tokens.dtype), words


def synonym_table(
    pairs: Mapping[int, Sequence[int]], vocab_size: int, max_synonyms: int
) -> np.ndarray:
    """int32 `[vocab_size, max_synonyms]`: row t the first `max_synonyms` synonyms of t, -1 after.

    `pairs` maps a token id to single-token synonym ids; a token itself and special ids are left
    out; an id outside `[0, vocab_size)` is a ValueError naming it.
    """
    table = np.full((vocab_size, max_synonyms), -1, np.int32)
    for tok, syns in pairs.items():
        for i in (tok, *syns):
            if not 0 <= int(i) < vocab_size:
                raise ValueError(f"synonym id {i} is outside the vocabulary [0, {vocab_size})")
        if tok < NUM_SPECIAL:
            continue
        kept = [s for s in dict.fromkeys(int(s) for s in syns) if s != tok and s >= NUM_SPECIAL]
        table[tok, : min(len(kept), max_synonyms)] = kept[:max_synonyms]
    return table


# config.clear.augmentations names (the paper's tables') -> (function, its ratio key).
AUGMENTATIONS: dict[str, tuple[Callable[..., Example], str]] = {
    "del_word": (word_deletion, "del_word_ratio"),
    "del_span": (span_deletion, "del_span_ratio"),
    "reorder": (reordering, "reorder_ratio"),
    "subs": (synonym_substitution, "subs_ratio"),
}


def augment_example(
    key: jax.Array, tokens: jax.Array, words: jax.Array, config: Any, table: Any = None
) -> Example:
    """One view: `config.augmentations` applied in order, each with its ratio and own key."""
    for i, name in enumerate(config.augmentations):
        if name not in AUGMENTATIONS:
            raise ValueError(f"clear.augmentations has {name!r}: one of {list(AUGMENTATIONS)}")
        fn, ratio_key = AUGMENTATIONS[name]
        k = jax.random.fold_in(key, i)
        ratio = float(config[ratio_key])
        if name == "subs":
            if table is None:
                raise ValueError("clear.augmentations has 'subs' but no synonym table is loaded")
            tokens, words = fn(k, tokens, words, table, ratio)
        else:
            tokens, words = fn(k, tokens, words, ratio)
    return tokens, words


def clear_views(
    key: jax.Array, tokens: jax.Array, words: jax.Array, config: Any, table: Any = None
) -> jax.Array:
    """Two augmented views of a batch `[B, L]` -> token ids `[2, B, L]` (`config.clear`'s)."""
    b = tokens.shape[0]

    def view(v: int) -> jax.Array:
        keys = jax.random.split(jax.random.fold_in(key, v), b)
        aug = jax.vmap(lambda k, t, w: augment_example(k, t, w, config, table)[0])
        return aug(keys, tokens, words)

    return jnp.stack([view(0), view(1)])


def mlm_mask(
    key: jax.Array, tokens: jax.Array, vocab_size: int, rate: float = 0.15
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BERT's masking: `(inputs, targets, weights)`, each ordinary token chosen with prob `rate`.

    A chosen token becomes [MASK] with prob 0.8, a random ordinary token with 0.1, stays with
    0.1 (Devlin et al. 2019, section 3.1); special tokens are never chosen. `targets` are the
    original ids, `weights` 1.0 where chosen (the loss's positions), else 0.0.
    """
    k_pick, k_kind, k_rand = jax.random.split(key, 3)
    chosen = (tokens >= NUM_SPECIAL) & (jax.random.uniform(k_pick, tokens.shape) < rate)
    u = jax.random.uniform(k_kind, tokens.shape)
    random_ids = jax.random.randint(k_rand, tokens.shape, NUM_SPECIAL, vocab_size)
    replaced = jnp.where(u < 0.8, MASK, jnp.where(u < 0.9, random_ids, tokens))
    inputs = jnp.where(chosen, replaced, tokens).astype(tokens.dtype)
    return inputs, tokens, chosen.astype(jnp.float32)


def mlm_positions(
    targets: jax.Array, weights: jax.Array, num: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first `num` chosen positions of each row: `(positions, targets, weights)`, `[B, num]`.

    BERT's `max_predictions_per_seq`: the MLM head runs on these positions only, not on every
    token of the batch (its vocabulary-wide output is the step's largest matmul). Rows with
    fewer chosen tokens are padded with weight 0; `num` at twice the expected count drops a
    chosen token almost never.
    """
    length = weights.shape[-1]
    # Chosen positions first, in order: a stable sort of their keys (position, or L + position).
    order = jnp.argsort(jnp.where(weights > 0, 0, length) + jnp.arange(length), axis=-1)
    positions = order[:, :num].astype(jnp.int32)
    take = functools.partial(jnp.take_along_axis, indices=positions, axis=-1)
    return positions, take(targets), take(weights)


def mlm_num_positions(max_len: int, rate: float) -> int:
    """Predicted positions per row: twice the expected count at `rate` (at least 1, at most L)."""
    return int(min(max_len, max(1, math.ceil(2 * rate * max_len))))
