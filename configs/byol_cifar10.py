"""BYOL on CIFAR-10: ResNet-18 (CIFAR stem), batch 256, LARS 1.0, 1000 epochs.

    python -m simclr_jax.main --config=configs/byol_cifar10.py --workdir=runs/byol_cifar10

The settings the common open implementations use on CIFAR (e.g. solo-learn's BYOL recipe):
projector 4096 -> 256, predictor 4096, target EMA from 0.99 to 1, LARS lr 1.0 (B = 256) with
biases and BN excluded, weight decay 1e-5, 10 warm-up epochs. Expect ~92% linear accuracy.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the BYOL CIFAR-10 config."""
    c = sibling_config(__file__, "cifar10")
    c.method = "byol"
    c.batch_size = 256
    c.num_epochs = 1000.0
    c.byol.base_momentum = 0.99
    c.byol.predictor_hidden_dim = 4096

    c.augment.solarize_prob = 0.1  # BYOL's 0 / 0.2 on the two views, averaged

    c.model.head_layers = 2
    c.model.head_hidden_dim = 4096
    c.model.head_out_dim = 256

    c.optim.name = "lars"
    c.optim.base_lr = 1.0
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 1e-5
    c.optim.trust_coefficient = 0.02
    c.optim.warmup_epochs = 10.0
    return c
