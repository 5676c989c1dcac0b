"""CLEAR on a small real English corpus, offline: the default text run (600 steps on 2 CPU cores).

    python -m simclr_jax.main --config=configs/clear_text.py --workdir=runs/clear_text

Pretrains a BERT-Tiny-sized text Transformer (2 blocks of width 128; Turc et al. 2019's size) with
CLEAR's objective (two augmented views per sentence, NT-Xent over the batch, plus BERT's MLM) on
the 2,681 sentences of the Lee news corpus that ships with gensim (`dataset='lee_news'`,
`pip install -r requirements-text.txt`). A WordPiece vocabulary is trained on the corpus at the
first start (WORKDIR/tokenizer.json). The end-of-run table compares the pretrained encoder with
the same encoder at random init on Lee's document-similarity ratings (STS: Spearman's rho of the
cosine similarities) and on Pang & Lee's sentence polarity (logistic-regression probe).
Seeds 0-2 on a 2-core CPU (~25 min each under load): STS 0.05-0.07 at random init -> 0.08-0.15
(docs/methods.md has the table and what limits it). Real datasets run through the same code:
`--config.dataset=tfds_text --config.data.tfds_name=...`,
`--config.eval.sts_task=stsb --config.eval.probe_task=sst2`.
"""

from simclr_jax.config_base import base_config


def get_config():
    """Returns the default text (CLEAR) config."""
    c = base_config()
    c.method = "clear"
    c.dataset = "lee_news"
    c.batch_size = 128
    c.total_steps = 600
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200

    c.model.name = "text"
    c.model.variant = "bert-tiny"
    c.model.vocab_size = 4096  # a ~60k-word corpus: a small WordPiece vocabulary
    c.model.max_len = 64  # tokens with [CLS] and [SEP]; longer texts are truncated and counted
    c.model.pool = "gap"  # mean of the sentence's tokens
    c.model.head_hidden_dim = 256
    c.model.head_out_dim = 128

    c.optim.name = "adamw"  # BERT's optimizer family; LARS is for huge image batches
    c.optim.base_lr = 1e-3
    c.optim.lr_scaling = "none"
    c.optim.weight_decay = 0.01
    c.optim.warmup_epochs = 2

    c.eval.sts_task = "lee"
    c.eval.probe_task = "polarity"
    c.eval.batch_size = 256
    return c
