"""SimSiam on the bundled digits: the digits run with the SimSiam objective, twice as long.

    python -m simclr_jax.main --config=configs/simsiam_digits.py --workdir=runs/simsiam_digits

Same data, augmentations and encoder as configs/digits.py; SimSiam's SGD with a fixed-LR
predictor at the LR the open CIFAR recipes use (0.5 at batch 256, weight decay 1e-5), BYOL's
digits head shape, and 800 steps (~7 minutes on 2 cores). SimSiam first partly collapses
(rankme 75 -> ~40 by step 100) and then recovers; in SimCLR's 400 steps it ends near random
init on some seeds, at 800 it beats it (docs/methods.md has the seeds).
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the SimSiam digits config."""
    c = sibling_config(__file__, "digits")
    c.method = "simsiam"
    c.total_steps = 800  # ~160 epochs: 400 left seed 2 below random init (docs/methods.md)
    c.checkpoint_every_steps = 200
    # BYOL's digits shape (256-wide projector and predictor, 64-d projection): the 128/32
    # bottleneck gave kNN 0.769, a 512-wide one 0.781 (docs/methods.md).
    c.simsiam.predictor_hidden_dim = 256
    c.model.head_hidden_dim = 256
    c.model.head_out_dim = 64

    c.optim.name = "sgd"
    c.optim.base_lr = 0.5  # peak 0.5 * 256 / 256
    c.optim.lr_scaling = "linear"
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-5
    c.optim.constant_lr_params = ("predictor",)
    return c
