"""Shared tiny configs for tests: a ResNet-18 at base width 4 on 8 px digits compiles in seconds."""

import os

from simclr_jax import config_base

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name: str):
    """`get_config()` of configs/<name>.py."""
    return config_base.sibling_config(os.path.join(CONFIGS_DIR, "x.py"), name)


def tiny_config(base: str = "digits", **overrides):
    """configs/<base>.py shrunk to 8 px, base width 4, batch 32, 30 steps, no prefetch thread."""
    c = load_config(base)
    c.batch_size = 32
    c.total_steps = 30
    c.log_every_steps = 10
    c.checkpoint_every_steps = 10
    c.data.image_size = c.augment.image_size = 8
    c.data.prefetch = 0
    c.model.base_width = 4
    c.model.head_hidden_dim, c.model.head_out_dim = 16, 16
    c.optim.warmup_epochs = 1
    c.eval.batch_size = 256
    for k, v in overrides.items():
        c[k] = v
    return c
