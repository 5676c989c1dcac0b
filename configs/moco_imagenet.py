"""MoCo v2 on ImageNet: ResNet-50, batch 256, queue 65536, momentum 0.999, t = 0.2, 200 epochs.

    python -m simclr_jax.main --config=configs/moco_imagenet.py --workdir=gs://bucket/moco_r50 \
        --config.data.manual_dir=/data/imagenet_tars

The MoCo v2 recipe (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"):
SGD lr 0.03 x B/256 with cosine decay, weight decay 1e-4, a 2048-d MLP head without BN, and
SimCLR's augmentations with blur. Data and encoder settings come from configs/imagenet.py.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the MoCo ImageNet config."""
    c = sibling_config(__file__, "imagenet")
    c.method = "moco"
    c.batch_size = 256
    c.num_epochs = 200.0
    c.moco.queue_size = 65536  # 256 global batches of keys
    c.moco.momentum = 0.999
    c.moco.temperature = 0.2

    c.augment.color_jitter_strength = 0.5  # MoCo v2's ColorJitter(0.4, 0.4, 0.4, 0.1)
    c.augment.blur_prob = 0.5

    c.model.head_layers = 2
    c.model.head_hidden_dim = 2048
    c.model.head_out_dim = 128
    c.model.head_bn = False  # MoCo v2's MLP head has no BN

    c.optim.name = "sgd"
    c.optim.base_lr = 0.03  # linear scaling: 0.03 at batch 256
    c.optim.lr_scaling = "linear"
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_epochs = 0.0
    c.eval.batch_size = 1024
    return c
