"""Deep InfoMax on the bundled digits: AMDIM's cross-view pairs, cosine scores at T = 0.2.

    python -m simclr_jax.main --config=configs/dim_digits.py --workdir=runs/dim_digits

The digits run (ResNet-18, CIFAR stem, width 16, 600 steps, AdamW) with `method='dim'`: the
global code of each view against the 4 x 4 local map (the encoder's stage 3) of the other view.
The paper's form (each view on its own, raw dot-product scores) ends below the random-init
encoder on the digits; docs/methods.md has the figures of each variant.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the DIM digits config."""
    c = sibling_config(__file__, "digits")
    c.method = "dim"
    c.dim.estimator = "infonce"
    c.dim.cross_view = True
    c.dim.temperature = 0.2
    c.dim.local_hidden_dim = 512
    return c
