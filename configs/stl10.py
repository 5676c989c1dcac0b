"""SimCLR on STL-10: pretrain on unlabelled+train (105k images, 96 px), evaluate on train/test.

python -m simclr_jax.main --config=configs/stl10.py --workdir=runs/stl10
"""

from simclr_jax.config_base import base_config


def get_config():
    """Returns the STL-10 config."""
    c = base_config()
    c.dataset = "stl10"
    c.batch_size = 512
    c.num_epochs = 500.0
    c.simclr.temperature = 0.2
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000

    c.data.image_size = 96
    c.augment.image_size = 96
    c.augment.color_jitter_strength = 1.0
    c.augment.blur_prob = 0.5  # 96 px is large enough for blur (kernel 9)

    c.model.depth = 50
    c.model.stem = "cifar"  # 96 px: the ImageNet stem's 4x downsampling loses too much
    c.model.head_hidden_dim = 2048
    c.model.head_out_dim = 128

    c.optim.base_lr = 0.3
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 1e-6
    c.optim.warmup_epochs = 10.0
    c.eval.batch_size = 512
    return c
