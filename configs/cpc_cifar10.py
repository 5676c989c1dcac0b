"""CPC v2 on CIFAR-10: a 3 x 3 grid of 16 px patches (stride 8) of the 32 px images.

    python -m simclr_jax.main --config=configs/cpc_cifar10.py --workdir=runs/cpc_cifar10

configs/cifar10.py's data and ResNet-18 (CIFAR stem) on every patch, four directions each
predicting the next 2 rows (all a 3-row grid allows), InfoNCE against every patch of the global
batch with the paper's raw dot-product scores; per-patch colour augmentation and layer norm in
the encoder (`model.norm='layer'`) as CPC v2.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the CPC CIFAR-10 config."""
    c = sibling_config(__file__, "cifar10")
    c.method = "cpc"
    c.model.norm = "layer"
    c.model.patch_grid = 16
    c.model.patch_grid_stride = 8
    c.cpc.steps = 2
    c.cpc.directions = 4
    c.cpc.context_dim = 512
    c.cpc.temperature = 0.0
    c.optim.name = "adamw"
    c.optim.base_lr = 1e-3
    c.optim.lr_scaling = "none"
    c.optim.weight_decay = 0.0
    return c
