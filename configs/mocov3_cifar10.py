"""MoCo v3 on CIFAR-10: ViT-S/4 on 32 px images (64 patches), the paper's ViT recipe.

    python -m simclr_jax.main --config=configs/mocov3_cifar10.py --workdir=runs/mocov3_cifar10

The ImageNet ViT recipe (configs/mocov3_imagenet.py) at CIFAR scale: ViT-S/4 with fixed sin-cos
position embeddings and a frozen random patch projection, AdamW 1.5e-4 x B/256 (B = 512) with
weight decay 0.1, 40 warm-up epochs of 300, key EMA 0.99 -> 1, temperature 0.2, projector
3 x 4096 -> 256 and predictor 4096. Data and augmentations from configs/cifar10.py (no blur on
32 px images), solarize at BYOL's averaged 0.1. The paper trains no ViT on CIFAR from scratch:
these settings are not tuned here (no figures yet).
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the MoCo v3 CIFAR-10 config."""
    c = sibling_config(__file__, "cifar10")
    c.method = "mocov3"
    c.batch_size = 512
    c.num_epochs = 300.0
    c.mocov3.momentum = 0.99
    c.mocov3.temperature = 0.2
    c.mocov3.freeze_patch_embed = True
    c.mocov3.predictor_hidden_dim = 4096

    c.augment.solarize_prob = 0.1

    c.model.name = "vit"
    c.model.variant = "S/4"
    c.model.posemb = "sincos2d"
    c.model.head_layers = 3
    c.model.head_hidden_dim = 4096
    c.model.head_out_dim = 256

    c.optim.name = "adamw"
    c.optim.base_lr = 1.5e-4  # peak 1.5e-4 * 512 / 256 = 3e-4
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 0.1
    c.optim.warmup_epochs = 40.0
    return c
