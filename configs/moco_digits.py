"""MoCo v2 on the bundled digits: the default digits run with the MoCo objective.

    python -m simclr_jax.main --config=configs/moco_digits.py --workdir=runs/moco_digits

Same data, augmentations, encoder and optimizer as configs/digits.py, at its earlier run length
of 400 steps (the one docs/methods.md's figures and SimCLR's 400-step rows in
docs/benchmarks_history.md were measured at); only the objective changes. Equivalent to
`--config=configs/digits.py --config.method=moco --config.total_steps=400
--config.moco.queue_size=1024 --config.moco.momentum=0.99`. See docs/methods.md.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the MoCo digits config."""
    c = sibling_config(__file__, "digits")
    c.method = "moco"
    c.total_steps = 400
    # 4 global batches of 256: below the 1437 training digits, so the queue never holds an
    # image's own earlier key as a negative.
    c.moco.queue_size = 1024
    # A 400-step run: 0.999 (time constant 1000 steps) would leave the key encoder near its
    # random init for the whole run; 0.99 tracks the query encoder within ~100 steps.
    c.moco.momentum = 0.99
    c.moco.temperature = 0.2
    return c
