"""SimCLR on the bundled scikit-learn digits: the default run, ~5 minutes on 2 CPU cores.

    python -m simclr_jax.main --config=configs/digits.py --workdir=runs/digits

A ResNet-18 layout (CIFAR stem) at base width 16 on 16 px digits. It shows learning in minutes:
the end-of-run table compares the pretrained encoder with the same encoder at random init.
"""

from simclr_jax.config_base import base_config


def get_config():
    """Returns the digits config."""
    c = base_config()
    c.dataset = "digits"
    c.batch_size = 256
    c.total_steps = 400  # ~80 epochs of the 1437 training digits
    c.temperature = 0.2
    c.log_every_steps = 20
    c.checkpoint_every_steps = 100

    c.data.image_size = 16  # 8x8 digits upsampled: enough pixels for crops to mean something

    c.augment.image_size = 16
    c.augment.area_min = 0.25  # crops below a quarter of an 8x8 digit leave no digit
    c.augment.flip = False  # a mirrored 2 is not a 2
    c.augment.color_jitter_strength = 0.5
    c.augment.grayscale_prob = 0.0  # digits are grey already
    c.augment.blur_prob = 0.0  # CIFAR-size rule: no blur on tiny images

    c.model.depth = 18
    c.model.stem = "cifar"
    c.model.base_width = 16
    c.model.head_hidden_dim = 128
    c.model.head_out_dim = 64

    c.optim.base_lr = 1.0
    c.optim.weight_decay = 1e-4
    c.optim.warmup_epochs = 5

    c.eval.batch_size = 512
    return c
