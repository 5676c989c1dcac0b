"""Deep InfoMax on ImageNet: local DIM (InfoNCE) on the 14 x 14 stage-3 map of a ResNet-50.

    python -m simclr_jax.main --config=configs/dim_imagenet.py --workdir=runs/dim_imagenet

Local DIM as in the paper (InfoNCE, raw scores, each view on its own) on configs/imagenet.py's
data and encoder at batch 1024: the gathered local features are 1024 x 196 x 64 fp32 (51 MB)
and each device scores its images against all of them ([B/n, 1024, 196] fp32: 103 MB per
device on 8 devices). AdamW as the paper's Adam, no weight decay.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the DIM ImageNet config."""
    c = sibling_config(__file__, "imagenet")
    c.method = "dim"
    c.batch_size = 1024
    c.dim.estimator = "infonce"
    c.dim.local_hidden_dim = 2048
    c.model.head_hidden_dim = 2048
    c.model.head_out_dim = 64
    c.optim.name = "adamw"
    c.optim.base_lr = 1e-3
    c.optim.lr_scaling = "none"
    c.optim.weight_decay = 0.0
    return c
