"""A small ViT on the bundled digits: ViT-Ti/4 on the native 8 x 8 px digits (2 x 2 patches).

    python -m simclr_jax.main --config=configs/vit_digits.py --workdir=runs/vit_digits
    python -m simclr_jax.main --config=configs/vit_digits.py --workdir=runs/vit_digits_mocov3 \
        --config.method=mocov3

SimCLR by default; `--config.method=mocov3` trains the same encoder with MoCo v3 (its section
below: temperature 0.2, the ViT default; frozen random patch projection). The encoder has 5.5M
parameters. By multiply-adds, a view at 16 px (16 patches) costs 3.4x one at 8 px, and even at
8 px and batch 128 a SimCLR step costs 1.5x the ResNet default's (configs/digits.py), so the run
is 300 steps where the default takes 600 (MoCo v3 adds a key forward pass: 1.02x the default's
run). Both methods beat the random-init ViT: docs/methods.md has the figures.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the ViT digits config."""
    c = sibling_config(__file__, "digits")
    c.batch_size = 128
    c.total_steps = 300  # ~27 epochs of the 1437 training digits
    c.checkpoint_every_steps = 100

    c.data.image_size = 8  # the digits' own resolution: 4 patches of 4 x 4 px
    c.augment.image_size = 8
    c.augment.area_min = 0.3

    c.model.name = "vit"
    c.model.variant = "Ti/4"
    c.model.posemb = "sincos2d"  # MoCo v3's fixed embedding; nothing to learn from 1437 images
    c.model.head_layers = 2
    c.model.head_hidden_dim = 256
    c.model.head_out_dim = 64

    c.simclr.temperature = 0.2
    c.mocov3.momentum = 0.99  # -> 1 on a cosine; time constant 100 steps, a third of the run
    c.mocov3.predictor_hidden_dim = 256

    # AdamW, as ViTs train (and MoCo v3's ViT recipe); at 1.5e-4 x B/256 (the paper's, for 300
    # epochs of ImageNet) 300 steps barely leave the warm-up.
    c.optim.name = "adamw"
    c.optim.base_lr = 1e-3
    c.optim.lr_scaling = "none"
    c.optim.weight_decay = 0.05
    c.optim.warmup_epochs = 3  # ~33 steps
    return c
