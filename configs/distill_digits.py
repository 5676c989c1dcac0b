"""SimCLR v2's recipe on the digits, step 3: self-distil a fine-tuned teacher without labels.

    python -m simclr_jax.main --config=configs/digits.py --workdir=runs/digits
    python -m simclr_jax.main --mode=finetune --config=configs/finetune_digits.py \\
        --workdir=runs/digits_ft10 --config.init_from=runs/digits/export \\
        --config.finetune.label_fraction=0.1
    python -m simclr_jax.main --mode=distill --config=configs/distill_digits.py \\
        --workdir=runs/digits_distill --config.distill.teacher=runs/digits_ft10

The student has the teacher's architecture (ResNet-18, CIFAR stem, base width 16) and starts
from scratch; it learns the teacher's softened predictions on all 1437 training digits, their
labels unread. docs/training.md has the figures of this chain.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the digits distillation config."""
    c = sibling_config(__file__, "finetune_digits")
    c.distill.teacher = ""  # required: the fine-tune run's workdir (or an export with a head)
    c.distill.student = "teacher"  # self-distillation
    c.distill.temperature = 0.1  # the paper's for self-distillation
    c.distill.label_weight = 0.0  # the unlabelled images only
    c.distill.epochs = 60.0
    c.distill.batch_size = 128
    c.distill.optimizer = "sgd"  # momentum SGD (Nesterov), as the digits fine-tuning
    c.distill.base_lr = 0.1
    c.distill.lr_scaling = "linear"  # peak 0.1 x 128 / 256
    c.distill.weight_decay = 1e-4
    c.distill.warmup_epochs = 3.0
    c.distill.eval_every_epochs = 20.0
    return c
