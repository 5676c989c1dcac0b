"""SimCLR v1 on ImageNet: ResNet-50, batch 4096, LARS 0.3 x B/256, 100 epochs (SimCLR paper).

    python -m simclr_jax.main --config=configs/imagenet.py --workdir=gs://bucket/simclr_r50 \
        --config.data.manual_dir=/data/imagenet_tars

The host samples each image's two random-resized-crop windows on the original JPEG, decodes only
their union and resizes it once to 256 px; the device cuts the two views out of it, then flips,
colours and blurs them (docs/data.md). --config.data.host_size=0 resizes each view on the host
instead: full detail for small crops, about 0.8x the host throughput. For SimCLR v2 use
--config.model.head_layers=3 and a larger width.
"""

from simclr_jax.config_base import base_config


def get_config():
    """Returns the ImageNet config."""
    c = base_config()
    c.dataset = "imagenet2012"
    c.batch_size = 4096
    c.num_epochs = 100.0
    c.simclr.temperature = 0.1
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2500

    c.data.image_size = 224
    c.data.host_crop = True  # random-resized-crop at decode time, on the original image
    # The host sends the union of the two crop windows at 256 px; the device cuts the views.
    c.data.host_size = 256
    c.data.prefetch = 4
    # The end-of-run evaluation is a bounded check (features of 50k train / 50k val images, fast
    # probe + kNN); --mode=linear_eval runs the full protocol, streamed (host memory is bounded
    # by batch and prefetch sizes, not by the dataset).
    c.data.eval_max_examples = 50_000

    c.augment.crop = False  # the host already cropped
    c.augment.image_size = 224
    c.augment.color_jitter_strength = 1.0
    c.augment.blur_prob = 0.5

    c.model.depth = 50
    c.model.stem = "imagenet"
    c.model.head_layers = 2
    c.model.head_hidden_dim = 2048
    c.model.head_out_dim = 128
    c.model.dtype = "bfloat16"  # compute in bf16; params, BN statistics and the loss stay fp32

    c.optim.base_lr = 0.3  # peak 0.3 * 4096 / 256 = 4.8
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = 1e-6
    c.optim.warmup_epochs = 10.0
    c.eval.batch_size = 1024
    c.eval.linear_epochs = 10.0  # fast probe on the 50k capped features
    c.eval.linear_batch_size = 4096

    # --mode=linear_eval reproduces the official command (google-research/simclr): 90 epochs,
    # global batch 4096, momentum SGD (Nesterov), LR 0.1 x B/256, no warm-up, weight decay 1e-6,
    # random resized crop + flip; top-1 / top-5 on the 50k validation images (centre crop).
    c.linear_eval.epochs = 90.0
    c.linear_eval.batch_size = 4096
    c.linear_eval.optimizer = "sgd"
    c.linear_eval.base_lr = 0.1
    c.linear_eval.lr_scaling = "linear"
    c.linear_eval.weight_decay = 1e-6
    c.linear_eval.warmup_epochs = 0.0
    c.linear_eval.augment = True
    c.linear_eval.knn = False  # a 1.28M x 2048 bank: enable on a pod (it is sharded, ~10 GB)
    return c
