"""InstDisc (memory bank) on the bundled digits: the default digits run with the InstDisc objective.

    python -m simclr_jax.main --config=configs/instdisc_digits.py --workdir=runs/instdisc_digits

Same data, augmentations and encoder as configs/digits.py, at its earlier run length of 400
steps (the one docs/methods.md's figures were measured at). The memory bank holds one 128-d
embedding per training digit (1437 rows, sharded over the devices); 1024 of them are the
negatives of each step (the paper's 4096 exceeds the dataset). The optimizer is the digits
default's AdamW (the paper's SGD 0.03 moves too little in 400 steps, LARS did not learn with the
NCE loss). See docs/methods.md.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the InstDisc digits config."""
    c = sibling_config(__file__, "digits")
    c.method = "instdisc"
    c.total_steps = 400
    c.model.head_out_dim = 128  # the bank's embedding (the paper's 128-d)
    c.instdisc.num_negatives = 1024
    c.instdisc.temperature = 0.07
    c.instdisc.bank_momentum = 0.5
    c.instdisc.loss = "nce"
    # The digits default's AdamW (0.002, no LR scaling): NCE's gradients at t = 0.07 sum K terms
    # of size 1/t, and a memory bank needs a network that changes smoothly between its visits
    # to an example (once an epoch). At 0.004 it learned less (kNN 0.844; docs/methods.md).
    return c
