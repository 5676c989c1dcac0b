"""SimSiam on the bundled digits: the default digits run with the SimSiam objective.

    python -m simclr_jax.main --config=configs/simsiam_digits.py --workdir=runs/simsiam_digits

Same data, augmentations, encoder and run length as configs/digits.py; SimSiam's SGD with a
fixed-LR predictor, at the LR the open CIFAR recipes use (0.5 at batch 256, weight decay 1e-5).
Measured (docs/methods.md): 400 steps are not enough for SimSiam here -- its features first
partly collapse (rankme 80 -> 17 by step 100) and are still recovering at the end, so the
pretrained encoder stays below random init (kNN 0.769 against 0.831; the paper's 0.05 gave 0.694).
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
    c.optim.base_lr = 0.5  # peak 0.5 * 256 / 256
    c.optim.lr_scaling = "linear"
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-5
    c.optim.constant_lr_params = ("predictor",)
    return c
