"""SimSiam on the bundled digits: the default digits run with the SimSiam objective.

    python -m simclr_jax.main --config=configs/simsiam_digits.py --workdir=runs/simsiam_digits

Same data, augmentations, encoder and run length as configs/digits.py; SimSiam's SGD with a
fixed-LR predictor. See docs/methods.md.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the SimSiam digits config."""
    c = sibling_config(__file__, "digits")
    c.method = "simsiam"
    c.simsiam.predictor_hidden_dim = 32  # a bottleneck: a quarter of the projection
    c.model.head_hidden_dim = 128
    c.model.head_out_dim = 128

    c.optim.name = "sgd"
    c.optim.base_lr = 0.05  # peak 0.05 * 256 / 256
    c.optim.lr_scaling = "linear"
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.constant_lr_params = ("predictor",)
    return c
