"""Fine-tune a digits export on labelled digits (all labels, or a 10% / 1% class-balanced subset).

    python -m simclr_jax.main --mode=finetune --config=configs/finetune_digits.py \
        --workdir=runs/digits_ft --config.init_from=runs/digits/export \
        [--config.finetune.label_fraction=0.1] [--config.finetune.from_head_layer=1]

The architecture comes from the export's export.json; this file sets data, augmentation
(crop + flip only, as SimCLR's fine-tuning) and the optimizer.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the digits fine-tuning config."""
    c = sibling_config(__file__, "digits")
    c.init_from = ""  # required: path to a pretraining run's export/ folder

    c.augment.area_min = 0.5  # milder crops than pretraining: labels must stay readable

    c.finetune.epochs = 30.0
    c.finetune.batch_size = 128
    c.finetune.optimizer = "sgd"  # momentum SGD (Nesterov); LARS for huge batches
    c.finetune.base_lr = 0.05
    c.finetune.lr_scaling = "linear"  # peak 0.05 x 128 / 256
    c.finetune.weight_decay = 0.0
    c.finetune.warmup_epochs = 0.0
    c.finetune.label_fraction = 1.0  # 0.1 and 0.01 as in SimCLR's semi-supervised table
    c.finetune.from_head_layer = 0  # SimCLR v2 fine-tunes from head layer 1 of 3
    c.finetune.eval_every_epochs = 10.0
    return c
