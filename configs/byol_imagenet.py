"""BYOL on ImageNet: ResNet-50, batch 4096, LARS 0.2 x B/256, 1000 epochs (Grill et al. 2020).

    python -m simclr_jax.main --config=configs/byol_imagenet.py --workdir=gs://bucket/byol_r50 \
        --config.data.manual_dir=/data/imagenet_tars

The paper's recipe: projector 4096 -> 256 and predictor 4096 -> 256 (BN + ReLU inside), target
EMA from 0.996 to 1 on a cosine, LARS with biases and BN excluded from weight decay and trust
ratio, weight decay 1.5e-6, 10 warm-up epochs then cosine decay. Data and encoder come from
configs/imagenet.py. BYOL's augmentations are asymmetric (blur 1.0 / 0.1, solarize 0 / 0.2 on
the two views); ours are the same for both views, so the config uses the averages (0.55 / 0.1).
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the BYOL ImageNet config."""
    c = sibling_config(__file__, "imagenet")
    c.method = "byol"
    c.batch_size = 4096
    c.num_epochs = 1000.0
    c.byol.base_momentum = 0.996
    c.byol.predictor_hidden_dim = 4096

    c.augment.color_jitter_strength = 0.5  # BYOL's (0.4, 0.4, 0.2, 0.1); saturation 0.4 here
    c.augment.blur_prob = 0.55
    c.augment.solarize_prob = 0.1

    c.model.head_layers = 2
    c.model.head_hidden_dim = 4096
    c.model.head_out_dim = 256

    c.optim.name = "lars"
    c.optim.base_lr = 0.2  # peak 0.2 * 4096 / 256 = 3.2
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 1.5e-6
    c.optim.warmup_epochs = 10.0
    return c
