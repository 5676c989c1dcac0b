"""Deep InfoMax on CIFAR-10: local DIM (InfoNCE) on the 8 x 8 local map of a ResNet-18.

    python -m simclr_jax.main --config=configs/dim_cifar10.py --workdir=runs/dim_cifar10

The paper's objective (Hjelm et al. 2019): local DIM with the InfoNCE estimator, each image's
global code against its own 8 x 8 local features (here the CIFAR-stem ResNet-18's stage-3 map,
the paper's local map size), raw dot-product scores, negatives from the global batch; the prior
matching term is left out (docs/methods.md). The encoder, augmentations, batch and length are
configs/cifar10.py's (the paper used smaller DCGAN/AlexNet-style encoders); the optimiser is
Adam-style (AdamW at 1e-3 without weight decay), as the paper trained with Adam.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the DIM CIFAR-10 config."""
    c = sibling_config(__file__, "cifar10")
    c.method = "dim"
    c.dim.estimator = "infonce"
    c.dim.cross_view = False
    c.dim.temperature = 0.0
    c.dim.local_hidden_dim = 2048
    c.model.head_hidden_dim = 2048
    c.model.head_out_dim = 64
    c.optim.name = "adamw"
    c.optim.base_lr = 1e-3
    c.optim.lr_scaling = "none"
    c.optim.weight_decay = 0.0
    return c
