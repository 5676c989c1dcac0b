"""SimSiam on CIFAR-10: ResNet-18 (CIFAR stem), batch 512, SGD 0.03 x B/256, 800 epochs.

    python -m simclr_jax.main --config=configs/simsiam_cifar10.py --workdir=runs/simsiam_cifar10

The paper's CIFAR recipe (Chen & He 2021, appendix): a 2-layer 2048-d projector with BN on its
output, a 512-d bottleneck predictor kept at a fixed LR, SGD momentum 0.9, weight decay 5e-4,
cosine decay without warm-up. Expect ~91% kNN / linear accuracy after 800 epochs.
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the SimSiam CIFAR-10 config."""
    c = sibling_config(__file__, "cifar10")
    c.method = "simsiam"
    c.batch_size = 512
    c.num_epochs = 800.0
    c.simsiam.predictor_hidden_dim = 512

    c.model.head_layers = 2
    c.model.head_hidden_dim = 2048
    c.model.head_out_dim = 2048

    c.optim.name = "sgd"
    c.optim.base_lr = 0.03  # peak 0.03 * 512 / 256 = 0.06
    c.optim.lr_scaling = "linear"
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.warmup_epochs = 0.0
    c.optim.constant_lr_params = ("predictor",)  # the paper's fixed predictor LR
    return c
