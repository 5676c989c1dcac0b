"""MoCo v3 on the bundled digits: the default digits run (ResNet) with the MoCo v3 objective.

    python -m simclr_jax.main --config=configs/mocov3_digits.py --workdir=runs/mocov3_digits

Same data, augmentations, encoder (ResNet-18 layout at base width 16, 16 px) and optimizer
(AdamW; the official ResNet recipe is LARS 0.6 x B/256, tuned for ImageNet) as the default;
the objective is MoCo v3's: a predictor, an EMA key network (0.99 -> 1 on a cosine) and the
symmetric InfoNCE against the global batch. For a ViT see configs/vit_digits.py with
--config.method=mocov3. See docs/methods.md.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the MoCo v3 digits config."""
    c = sibling_config(__file__, "digits")
    c.method = "mocov3"
    c.mocov3.momentum = 0.99
    c.mocov3.predictor_hidden_dim = 128  # the projector's width (model.head_hidden_dim)
    return c
