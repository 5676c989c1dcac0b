"""MoCo v2 on CIFAR-10: ResNet-18 (CIFAR stem), queue of 4096 keys, momentum 0.999, t = 0.2.

    python -m simclr_jax.main --config=configs/moco_cifar10.py --workdir=runs/moco_cifar10

Built on configs/cifar10.py (data, augmentations, encoder, run length); the objective and the
optimizer follow MoCo v2 (SGD with momentum, a 2-layer MLP head without BN). See docs/methods.md.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the MoCo CIFAR-10 config."""
    c = sibling_config(__file__, "cifar10")
    c.method = "moco"
    c.moco.queue_size = 4096  # 8 global batches of 512, under 10% of the 50k training images
    c.moco.momentum = 0.999
    c.moco.temperature = 0.2

    c.model.head_bn = False  # MoCo v2's MLP head: Dense -> ReLU -> Dense, no BN

    # MoCo v2 trains with plain SGD: lr 0.03 x B/256 (0.06 at batch 512), no warmup.
    c.optim.name = "sgd"
    c.optim.base_lr = 0.03
    c.optim.lr_scaling = "linear"
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4  # the usual CIFAR value for a ResNet-18
    c.optim.warmup_epochs = 0.0
    return c
