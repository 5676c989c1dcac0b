"""Every PRNG key of a run, derived from the one root seed: the derivations stated once.

`fold_in(key(seed), purpose)` with a fixed number per purpose, so a run is reproducible, a
resumed run continues the same streams, and two jobs that need "the same" key (the pretraining
run's step-0 init and the end-of-run evaluation's random-init encoder) cannot drift apart.
"""

from __future__ import annotations

import jax

# Purposes (the numbers are part of every saved run's identity: never renumber them).
INIT_PARAMS = 0  # the network's initial variables
STEP_STREAM = 1  # the pretraining step keys: fold_in(this, step)
METHOD_STATE = 2  # a method's extra state (queue, bank)
CLASSIFIER_STEPS = 11  # linear evaluation / fine-tuning step keys: fold_in(this, step)
PROBE = 13  # the fast linear probe's epoch orders


def derive(seed: int | jax.Array, purpose: int) -> jax.Array:
    """The key for `purpose` of the run seeded `seed` (works inside jit on a traced seed)."""
    return jax.random.fold_in(jax.random.key(seed), purpose)
