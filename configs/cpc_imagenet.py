"""CPC v2 on ImageNet: 7 x 7 patches of 64 px at stride 32 of a 256 px crop, ResNet-50 per patch.

    python -m simclr_jax.main --config=configs/cpc_imagenet.py --workdir=runs/cpc_imagenet

The grid of CPC v2 (Hénaff et al. 2019): a 256 px crop cut into 7 x 7 overlapping 64 px
patches, each augmented on its own, predictions in all four directions up to 5 rows ahead
(CPC's 7-row grid), InfoNCE against every patch of the global batch, raw dot-product scores.
The encoder normalises with layer norm (`model.norm='layer'`), as v2 does. Not the paper's: a
ResNet-50 (v2's best is a ResNet-161; its ResNet-50 row is 63.8% linear), a 512-wide context
network, AdamW at 1e-3 (scaled from batch 256).
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the CPC ImageNet config."""
    c = sibling_config(__file__, "imagenet")
    c.method = "cpc"
    c.batch_size = 512
    c.data.image_size = 256
    c.augment.image_size = 256
    c.model.norm = "layer"
    c.model.patch_grid = 64
    c.model.patch_grid_stride = 32
    c.cpc.steps = 5
    c.cpc.directions = 4
    c.cpc.context_dim = 512
    c.cpc.temperature = 0.0
    c.optim.name = "adamw"
    c.optim.base_lr = 1e-3
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 0.0
    return c
