"""SimCLR on CIFAR-10: the reference recipe (ResNet-18, CIFAR stem, batch 512, 1000 epochs).

    python -m simclr_jax.main --config=configs/cifar10.py --workdir=runs/cifar10

Needs the tfds dataset prepared once (`tfds build cifar10`, see docs/data.md). Expect ~90%+
linear-probe accuracy after 1000 epochs (SimCLR paper, appendix B.9).
"""

from simclr_jax.config_base import base_config


def get_config():
    """Returns the CIFAR-10 config."""
    c = base_config()
    c.dataset = "cifar10"
    c.batch_size = 512
    c.num_epochs = 1000.0
    c.simclr.temperature = 0.5
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000

    c.data.image_size = 32
    c.augment.image_size = 32
    c.augment.color_jitter_strength = 0.5
    c.augment.blur_prob = 0.0  # blur destroys 32 px images (SimCLR B.9)

    # The 3x3 stride-1 stem without max-pool: the ImageNet stem costs CIFAR ~10 points.
    c.model.depth = 18
    c.model.stem = "cifar"
    c.model.head_hidden_dim = 512  # = ResNet-18 feature dim
    c.model.head_out_dim = 128

    c.optim.base_lr = 1.0  # linear scaling: peak 1.0 * 512 / 256 = 2.0
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 1e-4
    c.optim.warmup_epochs = 10.0
    return c
