"""MoCo v3 on ImageNet: ViT-B/16, batch 4096, AdamW 1.5e-4 x B/256, 300 epochs (Chen et al. 2021).

    python -m simclr_jax.main --config=configs/mocov3_imagenet.py --workdir=gs://bucket/mocov3_b16 \
        --config.data.manual_dir=/data/imagenet_tars

The paper's ViT recipe (facebookresearch/moco-v3 CONFIG.md, "ViT-Base"): AdamW at
1.5e-4 x 4096/256 = 2.4e-3 after 40 warm-up epochs, weight decay 0.1, 300 epochs, key EMA from
0.99 to 1 on a cosine, temperature 0.2, a frozen random patch projection, fixed 2-D sin-cos
position embeddings, a 3-layer projector and 2-layer predictor (hidden 4096, out 256, BN).
76.7% linear top-1 in the paper. Its augmentations are BYOL's, asymmetric (blur 1.0 / 0.1,
solarize 0 / 0.2 on the two views); ours are the same for both views, so the averages.
Linear evaluation as the official main_lincls.py for ViTs: SGD at 3 x B/256, batch 1024,
no weight decay, 90 epochs. Data and eval sizes come from configs/imagenet.py.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the MoCo v3 ImageNet config."""
    c = sibling_config(__file__, "imagenet")
    c.method = "mocov3"
    c.batch_size = 4096
    c.num_epochs = 300.0
    c.mocov3.momentum = 0.99
    c.mocov3.momentum_cosine = True
    c.mocov3.temperature = 0.2  # the ViT value (the encoder's default, stated)
    c.mocov3.freeze_patch_embed = True
    c.mocov3.predictor_hidden_dim = 4096

    # BYOL's colour jitter (0.4, 0.4, 0.2, 0.1), "not strengthened": strength 0.5 gives
    # (0.4, 0.4, 0.4, 0.1), the closest this section holds; blur and solarize averaged.
    c.augment.color_jitter_strength = 0.5
    c.augment.blur_prob = 0.55
    c.augment.solarize_prob = 0.1
    c.augment.area_min = 0.08

    c.model.name = "vit"
    c.model.variant = "B/16"
    c.model.posemb = "sincos2d"
    c.model.pool = "tok"
    c.model.dtype = "bfloat16"
    c.model.head_layers = 3
    c.model.head_hidden_dim = 4096
    c.model.head_out_dim = 256

    c.optim.name = "adamw"
    c.optim.base_lr = 1.5e-4  # peak 1.5e-4 * 4096 / 256 = 2.4e-3
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 0.1
    c.optim.warmup_epochs = 40.0

    c.linear_eval.batch_size = 1024
    c.linear_eval.base_lr = 3.0  # main_lincls.py --lr=3 for ViTs: peak 3 * 1024 / 256 = 12
    c.linear_eval.weight_decay = 0.0
    return c
