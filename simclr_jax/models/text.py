"""A text Transformer sentence encoder (CLEAR, Wu et al. 2020, arXiv 2012.15466), BERT's MLM head.

Tokens `[CLS] t1..tk [SEP] [PAD]...` (int32 `[N, L]`, `L <= max_len`) -> a token embedding
(`embedding`, `vocab_size x width`) plus a learned position embedding (`pos_embedding`,
`[1, max_len, width]`), then the ViT's pre-norm blocks and final LayerNorm (`vit.Encoder`, same
parameter names) with an attention mask: pads, and anything after the first [SEP], are never
attended, so they change no other token's output and no pooled feature. Sizes are the ViT's
(`vit.VIT_SIZES`: 'mu', 'Ti', 'S', 'B', ...; a text encoder has no patch) plus BERT's compact
sizes (`BERT_SIZES`, Turc et al. 2019): 'bert-tiny' / 'bert-mini' / 'bert-small' /
'bert-medium', the sizes a CPU trains in minutes.

CLEAR pretrains a BERT-style Transformer (its encoder is RoBERTa/BERT-base sized); the sizes here
are ours to choose. No dropout (as the ViT here): `train` is accepted for the encoder signature.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models.vit import LN_EPSILON, POOLS, VIT_SIZES, Encoder

# The padding id. It must equal simclr_jax.data.tokenizer's PAD (a model may not import data).
PAD_ID = 0
# The [SEP] id, the end of a sentence: must equal data.tokenizer's SEP too.
SEP_ID = 3
NUM_SPECIAL = 6  # ids 0..5 are PAD, UNK, CLS, SEP, MASK, DEL (data.tokenizer's order)
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MAX_LEN = 64  # tokens per example, [CLS] and [SEP] included
# BERT's compact models (Turc et al. 2019, "Well-Read Students Learn Better", the released
# BERT-Tiny/Mini/Small/Medium): (width, depth, mlp_dim = 4 x width, heads = width / 64).
BERT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "bert-tiny": (128, 2, 512, 2),
    "bert-mini": (256, 4, 1024, 4),
    "bert-small": (512, 4, 2048, 8),
    "bert-medium": (512, 8, 2048, 8),
}
TEXT_SIZES = {**VIT_SIZES, **BERT_SIZES}


def token_mask(tokens: jax.Array) -> jax.Array:
    """`[N, L]` bool: True for the tokens of the sentence, [CLS] to the first [SEP] included.

    Pads and whatever follows the first [SEP] are False, so they are never attended or pooled.
    """
    sep_before = jnp.cumsum(tokens == SEP_ID, axis=-1) - (tokens == SEP_ID)
    return (tokens != PAD_ID) & (sep_before == 0)


class TextTransformer(nn.Module):
    """Token ids `[N, L]` -> pooled features `[N, width]` (fp32); `with_local`: also per token.

    `pool='gap'`: the mean over the sentence's tokens (`token_mask`); `'tok'`: the [CLS] output.
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    pool: str = "gap"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = True, with_local: bool = False) -> Any:
        """Pooled features; with `with_local`, (pooled, per-token outputs) for an MLM head."""
        del train
        n, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"{length} tokens per example exceed model.max_len={self.max_len}")
        valid = token_mask(tokens)
        init = nn.initializers.normal(stddev=0.02)  # BERT's initializer range
        x = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="embedding")(tokens)
        pe = self.param("pos_embedding", init, (1, self.max_len, self.width))
        x = (x + pe[:, :length]).astype(jnp.float32)
        # Key mask only: a pad's query still sees the sentence (no all-masked softmax row).
        mask = valid[:, None, None, :]
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype, name="Transformer")(
            x, mask
        )
        x = x.astype(jnp.float32)
        if self.pool == "tok":
            pooled = x[:, 0]
        else:
            w = valid[..., None].astype(jnp.float32)
            pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        return (pooled, x) if with_local else pooled


class MlmHead(nn.Module):
    """BERT's MLM head: Dense(width) -> GELU -> LayerNorm -> Dense(vocab_size) logits (fp32).

    Kernels from normal(0.02), BERT's initializer range: the first logits are near uniform, the
    loss near log(vocab_size).

    Untied: its output matrix is its own, not the token embedding (BERT ties them; with tiny
    models and a small vocabulary the difference is a few params, the loss is the same form).
    """

    vocab_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(stddev=0.02)
        y = nn.Dense(x.shape[-1], kernel_init=init, dtype=self.dtype, name="transform")(x)
        y = nn.LayerNorm(epsilon=LN_EPSILON, name="norm")(nn.gelu(y, approximate=False))
        y = nn.Dense(self.vocab_size, kernel_init=init, dtype=self.dtype, name="decoder")(y)
        return y.astype(jnp.float32)


def text_size(variant: str) -> tuple[int, int, int, int]:
    """`'S'` -> (width, depth, mlp_dim, heads); ValueError naming the allowed sizes."""
    if variant not in TEXT_SIZES:
        raise ValueError(
            f"model.variant={variant!r} is not a text encoder size: one of {list(TEXT_SIZES)} "
            "(no patch)"
        )
    return TEXT_SIZES[variant]


def check_text_config(m: Any) -> None:
    """ValueError (one line) for a bad text-encoder key of `config.model`."""
    text_size(m["variant"])
    if m["pool"] not in POOLS:
        raise ValueError(f"model.pool={m['pool']!r} is not one of {list(POOLS)}")
    vocab, max_len = m.get("vocab_size", DEFAULT_VOCAB_SIZE), m.get("max_len", DEFAULT_MAX_LEN)
    if not isinstance(vocab, int) or vocab <= NUM_SPECIAL:
        raise ValueError(f"model.vocab_size={vocab!r} must be an integer > {NUM_SPECIAL}")
    if not isinstance(max_len, int) or max_len < 3:
        raise ValueError(f"model.max_len={max_len!r} must be an integer >= 3 ([CLS] w [SEP])")


def build_text(
    variant: str,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_len: int = DEFAULT_MAX_LEN,
    pool: str = "gap",
    dtype: Any = jnp.float32,
) -> TextTransformer:
    """The text encoder of size `variant` ('S'); ValueError naming the allowed values."""
    check_text_config(dict(variant=variant, pool=pool, vocab_size=vocab_size, max_len=max_len))
    width, depth, mlp_dim, heads = text_size(variant)
    return TextTransformer(vocab_size, max_len, width, depth, mlp_dim, heads, pool, dtype)
