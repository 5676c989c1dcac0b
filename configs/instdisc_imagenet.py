"""InstDisc on ImageNet: ResNet-50, batch 256, 4096 NCE negatives, T = 0.07, 200 epochs.

    python -m simclr_jax.main --config=configs/instdisc_imagenet.py --workdir=gs://bucket/instdisc

The recipe of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination"): SGD lr 0.03 (x B/256) with momentum 0.9 and weight decay 5e-4, a memory
bank of 128-d embeddings updated with momentum 0.5, NCE against 4096 uniform negatives at
temperature 0.07. The bank (1.28M x 128 fp32, 656 MB) is sharded by rows over the devices.
Example indices are the records' places in the split: of the tfds dataset (ArrayRecord) or of
an image folder (`--config.dataset=image_folder --config.data.folder=DIR`).
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the InstDisc ImageNet config."""
    c = sibling_config(__file__, "imagenet")
    c.method = "instdisc"
    c.batch_size = 256
    c.num_epochs = 200.0
    c.instdisc.num_negatives = 4096
    c.instdisc.temperature = 0.07
    c.instdisc.bank_momentum = 0.5
    c.instdisc.loss = "nce"

    # The paper's head: the encoder's pooled features projected to 128-d (one linear layer).
    c.model.head_layers = 1
    c.model.head_out_dim = 128
    c.model.head_bn = False

    c.optim.name = "sgd"
    c.optim.base_lr = 0.03  # linear scaling: 0.03 at batch 256
    c.optim.lr_scaling = "linear"
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.warmup_epochs = 0.0
    c.eval.batch_size = 1024
    return c
