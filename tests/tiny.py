"""Shared tiny configs for tests: a ResNet-18 at base width 4 on 8 px digits compiles in seconds."""

import os

from simclr_jax import config_base, data
from simclr_jax.pretrain import state as pretrain_state
from simclr_jax.runtime import compiled

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name: str):
    """`get_config()` of configs/<name>.py."""
    return config_base.sibling_config(os.path.join(CONFIGS_DIR, "x.py"), name)


def tiny_config(base: str = "digits", **overrides):
    """configs/<base>.py shrunk to 8 px, base width 4, batch 32, 30 steps, no prefetch thread.

    On 'digits' the recipe the tests' expectations were set with stays: LARS 1.0 x B/256, wd 1e-4,
    temperature 0.2, crops >= 0.25 (the default's AdamW is tuned for 16 px and 400 steps).
    """
    c = load_config(base)
    if base == "digits":
        c.optim.name, c.optim.base_lr, c.optim.lr_scaling = "lars", 1.0, "linear"
        c.optim.weight_decay, c.simclr.temperature, c.augment.area_min = 1e-4, 0.2, 0.25
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


def loop_config(total_steps: int = 12, eval_at_end: bool = False):
    """`tiny_config` for whole runs of the loop: logs every 4 steps, checkpoints every 6.

    The loop tests run and resume this one run length (the LR schedule is part of the compiled
    step), so their train step compiles once in the suite and loads from its compile cache.
    """
    c = tiny_config(total_steps=total_steps, log_every_steps=4, checkpoint_every_steps=6)
    c.eval.at_end = eval_at_end
    return c


def init(model, *args, **kwargs):
    """`model.init(*args, **kwargs)` compiled as runs compile it (`compiled.jit_init`).

    Eager `init` compiles every op on its own at XLA's default -O3: ~20 s for a tiny ResNet,
    against ~2 s in one -O2 program (with the same bits as the -O3 program).
    """
    return compiled.jit_init(lambda: model.init(*args, **kwargs))()


def model_and_optimizer(config, steps_per_epoch: int | None = None):
    """(model, tx, schedule) as a run builds them; steps_per_epoch defaults to the dataset's."""
    info = data.dataset_info(config)
    spe = steps_per_epoch or info.num_train_examples // config.batch_size
    return pretrain_state.model_and_optimizer(config, info.num_classes, spe)


def data_config(dataset: str, batch_size: int, seed: int, **data_fields):
    """The data layer's view of a run: the schema's `data` section with `data_fields` set."""
    import ml_collections

    fields = {**config_base.base_config().data.to_dict(), **data_fields}
    return ml_collections.ConfigDict(
        dict(dataset=dataset, seed=seed, batch_size=batch_size, data=fields)
    )
