"""CLEAR (Wu et al. 2020, arXiv 2012.15466): contrastive sentence pretraining plus BERT's MLM.

Two augmented views of each sentence (`augment_text.clear_views`: word deletion, span deletion,
reordering, synonym substitution, the paper's four) go through a text Transformer and a
projection head; NT-Xent over the **global** batch makes them a positive pair against every other
view. BERT's masked-language-model loss on a masked copy of the original sentence is added:
`loss = nt_xent + mlm_weight * mlm` (the paper trains the sum of the two; its results tables
name each run "MLM + <augmentations>"). `config.clear` holds the keys; docs/methods.md says
which of them come from the paper and which are ours.

Batches: `{'tokens', 'words', 'label'}` int32 (`data` text sources; labels may be -1). The
synonym table (`config.clear.synonyms`, a `word<TAB>syn1<TAB>syn2` file mapped to token ids
through the run's tokenizer) lives in the method state, so the step stays pure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from simclr_jax import augment_text, losses, models
from simclr_jax.config.checks import ConfigError, check
from simclr_jax.methods import base
from simclr_jax.methods.state import TrainState, online_linear_metrics, step_key
from simclr_jax.runtime import parallel


class ClearModel(nn.Module):
    """Text encoder + projection head + online linear head + MLM head.

    `mlm_every=k > 0`: the rows come in groups of k, k - 1 views and a masked sentence last (each
    example's rows together, so none moves between devices); the views go through the heads,
    the masked rows through the MLM head (`'mlm_logits'`, `[B, L, vocab]`, or `[B, P, vocab]` at
    `mlm_positions` [B, P], BERT's max_predictions_per_seq). The encoder runs
    once on all rows (no batch statistics in it); the projection head's BN sees views only.
    """

    encoder: Any
    head: Any
    mlm_head: models.MlmHead
    num_classes: int

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = True,
        mlm_every: int = 0,
        mlm_positions: jax.Array | None = None,
    ) -> dict[str, Any]:
        pooled, local = self.encoder(x, train=train, with_local=True)
        mlm_local = local if self.is_initializing() else None  # init creates every param
        if mlm_every:
            b = x.shape[0] // mlm_every
            pooled = pooled.reshape((b, mlm_every, -1))[:, :-1].reshape((-1, pooled.shape[-1]))
            mlm_local = local.reshape((b, mlm_every) + local.shape[1:])[:, -1]
            if mlm_positions is not None:  # [B, P]: the predicted positions only
                mlm_local = jnp.take_along_axis(mlm_local, mlm_positions[..., None], axis=1)
        head_outputs = self.head(pooled, train=train)
        out = {
            "features": pooled,
            "projection": head_outputs[-1],
            "head_outputs": head_outputs,
            "logits": models.LinearHead(self.num_classes, name="linear_head")(pooled),
        }
        if mlm_local is not None:
            out["mlm_logits"] = self.mlm_head(mlm_local)
        return out


def build_model(config: ml_collections.ConfigDict, num_classes: int, conv: Any = None) -> Any:
    """The text encoder (`config.model`, name 'text'), its heads and the MLM head."""
    m = config.model
    return ClearModel(
        encoder=models.create_encoder(m, conv),
        head=models.create_head(m),
        mlm_head=models.MlmHead(int(m.vocab_size), models.compute_dtype(m.dtype)),
        num_classes=num_classes,
    )


def mlm_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Mean cross-entropy and accuracy over the masked positions of the (global) batch."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return {
        "mlm_loss": jnp.sum(ce * weights) / denom,
        "mlm_acc": jax.lax.stop_gradient(jnp.sum(correct * weights) / denom),
    }


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: Any,
    mesh: Mesh,
    total_steps: int = 0,
    num_train_examples: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One CLEAR update: two views + a masked copy, NT-Xent + mlm_weight x MLM, online head."""
    cc = config.clear
    tokens, labels = batch["tokens"], batch["label"]
    b = tokens.shape[0]
    table = None if state.method_state is None else state.method_state.get("synonyms")
    key = step_key(state)
    views = augment_text.clear_views(jax.random.fold_in(key, 0), tokens, batch["words"], cc, table)
    masked, targets, weights = augment_text.mlm_mask(
        jax.random.fold_in(key, 1), tokens, int(config.model.vocab_size), cc.mlm_rate
    )
    num = augment_text.mlm_num_positions(tokens.shape[1], cc.mlm_rate)
    positions, targets, weights = augment_text.mlm_positions(targets, weights, num)
    # Rows (view 1, view 2, masked) of example i together: [3B, L].
    x = jnp.stack([views[0], views[1], masked], axis=1).reshape((3 * b, -1))
    nt_xent = parallel.over_global_batch(
        losses.nt_xent_with_metrics, mesh, temperature=cc.temperature
    )

    def loss_fn(params):
        out, new_stats = base.train_apply(
            model, params, state.batch_stats, x, mlm_every=3, mlm_positions=positions
        )
        z = out["projection"].reshape(b, 2, -1)
        contrastive, metrics = nt_xent(z[:, 0], z[:, 1])
        mlm = mlm_metrics(out["mlm_logits"], targets, weights)
        loss = contrastive + cc.mlm_weight * mlm["mlm_loss"]
        linear = online_linear_metrics(out["logits"].reshape(b, 2, -1), labels)
        metrics = {**metrics, **mlm, **linear, "contrastive_loss": contrastive}
        embeddings = (z[:, 0], z[:, 1], out["features"])
        return loss + linear["linear_loss"], (loss, metrics, new_stats, embeddings)

    return base.gradient_update(
        state, loss_fn, tx, schedule=schedule, config=config, total_steps=total_steps
    )


def config_defaults() -> ml_collections.ConfigDict:
    """`config.clear`: word deletion + reordering (no synonym table needed), MLM weight 1."""
    c = ml_collections.ConfigDict()
    c.temperature = 0.1  # NT-Xent temperature (ours: SimCLR's; the paper's was not checked)
    # Applied in order to each view (names: augment_text.AUGMENTATIONS). 'del_word' + 'reorder'
    # gave the paper's best SST-2 and MRPC results and needs no synonym table.
    c.augmentations = ("del_word", "reorder")
    c.del_word_ratio = 0.3  # fraction of the words deleted (each -> one [DEL])
    c.del_span_ratio = 0.3  # fraction of the words in the one deleted span (-> one [DEL])
    c.reorder_ratio = 0.3  # fraction of the words in the two swapped spans
    c.subs_ratio = 0.3  # fraction of the words substituted by a synonym
    c.mlm_weight = 1.0  # loss = nt_xent + mlm_weight * mlm (the paper: the plain sum)
    c.mlm_rate = 0.15  # BERT's: the fraction of ordinary tokens the MLM predicts
    c.synonyms = ""  # a 'word<TAB>syn1<TAB>syn2...' file ('' = none: 'subs' is refused)
    c.max_synonyms = 8  # synonyms kept per token id (columns of the table)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """A text encoder, known augmentations with ratios in [0, 1], 'subs' only with synonyms."""
    cc = c.clear
    check(c.model.name == "text", "model.name", c.model.name, "'text' with config.method='clear'")
    check(cc.temperature > 0, "clear.temperature", cc.temperature, "> 0")
    names = list(augment_text.AUGMENTATIONS)
    augs = tuple(cc.augmentations) if isinstance(cc.augmentations, (list, tuple)) else None
    check(
        bool(augs) and all(a in names for a in augs),
        "clear.augmentations",
        cc.augmentations,
        f"a non-empty tuple of {names}",
    )
    for _, ratio_key in augment_text.AUGMENTATIONS.values():
        check(0 <= cc[ratio_key] <= 1, f"clear.{ratio_key}", cc[ratio_key], "in [0, 1]")
    check(cc.mlm_weight >= 0, "clear.mlm_weight", cc.mlm_weight, ">= 0 (0: no MLM)")
    check(0 <= cc.mlm_rate < 1, "clear.mlm_rate", cc.mlm_rate, "in [0, 1) (BERT: 0.15)")
    check(cc.max_synonyms >= 1, "clear.max_synonyms", cc.max_synonyms, ">= 1")
    check(
        "subs" not in augs or bool(cc.synonyms),
        "clear.augmentations",
        cc.augmentations,
        "without 'subs' unless clear.synonyms names a synonym file",
    )
    check(
        not cc.synonyms or os.path.isfile(cc.synonyms),
        "clear.synonyms",
        cc.synonyms,
        "an existing 'word<TAB>syn1<TAB>syn2' file, or '' for none",
    )


def synonym_ids(
    path: str, token_to_id: Callable[[str], int | None], lowercase: bool = True
) -> dict[int, list[int]]:
    """The lines `word<TAB>syn1<TAB>syn2...` of `path` as token ids; words of one token only.

    `token_to_id` (a tokenizer's) gives None for a word that is not one token in its vocabulary;
    such words, as heads or synonyms, are left out.
    """
    pairs: dict[int, list[int]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = [w.strip() for w in line.rstrip("\n").split("\t") if w.strip()]
            ids = [token_to_id(w.lower() if lowercase else w) for w in fields]
            if len(ids) < 2 or ids[0] is None:
                continue
            pairs.setdefault(ids[0], []).extend(i for i in ids[1:] if i is not None)
    return pairs


def init_state(config: Any, variables: Any, key: jax.Array, num_train_examples: int) -> Any:
    """`{'synonyms': int32 [vocab, max_synonyms]}` with `config.clear.synonyms` set, else None."""
    cc = config.clear
    if not cc.synonyms:
        return None
    path = config.data.tokenizer  # the pretraining job resolves '' to WORKDIR/tokenizer.json
    if not path:
        raise ConfigError(
            f"config.clear.synonyms={cc.synonyms!r} needs config.data.tokenizer, the "
            "tokenizer.json that maps its words to ids (a run's WORKDIR/tokenizer.json)"
        )
    from simclr_jax.data import tokenizer  # only runs with synonyms read a tokenizer

    tok = tokenizer.load(path)
    pairs = synonym_ids(cc.synonyms, tok.token_to_id, bool(config.data.get("lowercase", True)))
    return {"synonyms": jnp.asarray(synonym_table(pairs, config))}


def synonym_table(pairs: Mapping[int, list[int]], config: Any) -> np.ndarray:
    """`augment_text.synonym_table` sized by `config.model.vocab_size`, `clear.max_synonyms`."""
    vocab = int(config.model.vocab_size)
    return augment_text.synonym_table(pairs, vocab, int(config.clear.max_synonyms))


METHOD = base.register(
    base.Method(
        name="clear",
        train_step=train_step,
        summary="CLEAR: NT-Xent over two augmented sentences + BERT's MLM (text encoder)",
        config_defaults=config_defaults,
        validate=validate,
        build_model=build_model,
        init_state=init_state,
        modality="text",
    )
)
