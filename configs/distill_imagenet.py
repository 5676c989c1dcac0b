"""SimCLR v2's distillation on ImageNet (Chen et al. 2020, arXiv 2006.10029).

    # a teacher: your own fine-tuned run (--mode=finetune ... --config.finetune.subset=10pct
    # --config.finetune.from_head_layer=1), or one of Google's fine-tuned v2 releases imported
    python -m simclr_jax.main --config=configs/imagenet.py --workdir=runs/r50_ft10 \\
        --mode=import_official \\
        --config.init_from=ckpts/finetuned_10pct/r50_1x_sk1/saved_model
    # self-distillation: the student has the teacher's encoder, learns on all 1.28M train images
    python -m simclr_jax.main --config=configs/distill_imagenet.py --workdir=runs/r50_distill \\
        --mode=distill --config.distill.teacher=runs/r50_ft10 \\
        --config.distill.teacher_head_layer=1   # the releases read projection-head layer 1
    # big-to-small: a ResNet-50 student of a big teacher (the paper's 73.9% / 77.5% rows)
    python -m simclr_jax.main --config=configs/distill_imagenet.py --workdir=runs/r50_from_r152 \\
        --mode=distill --config.distill.teacher=runs/r152_3x_sk1_ft10 \\
        --config.distill.student=model --config.distill.temperature=1.0

The paper's settings (section 3.1; what each value rests on: the comments below and
docs/training.md): unlabelled examples only, LARS (momentum 0.9), temperature 0.1 for
self-distillation and 1.0 for big-to-small, 400 epochs, random crop + flip only. The
learning-rate schedule, weight decay and batch are the pretraining's (our reading of the
paper, not checked against its text here): peak 0.1 x sqrt(B) = 6.4 after a 5% warm-up, then
cosine decay (the authors in google-research/simclr#77), weight decay 1e-4 (that repository's
README pretraining command) and batch 4096. The teacher runs in inference mode on the same
crop + flip the student sees, every step (a cache of its predictions, distill.cache_teacher,
fits only augment=False).
"""

from simclr_jax.config_base import sibling_config


def get_config():
    """Returns the ImageNet distillation config."""
    c = sibling_config(__file__, "imagenet")
    c.distill.teacher = ""  # required: a --mode=finetune workdir or an export with a classifier
    c.distill.teacher_head_layer = -1  # 1 for Google's fine-tuned v2 releases (see above)
    c.distill.student = "teacher"  # self-distillation; 'model': config.model (ResNet-50 here)
    c.distill.temperature = 0.1  # the paper's for self-distillation; 1.0 for big-to-small
    c.distill.label_weight = 0.0  # the paper's default: unlabelled examples only
    c.distill.epochs = 400.0  # the paper
    c.distill.batch_size = 4096  # the pretraining's (the paper: 4096, on 128 TPU cores)
    c.distill.optimizer = "lars"  # the paper: LARS (momentum 0.9) for every step
    c.distill.base_lr = 0.1  # the pretraining's 0.1 x sqrt(B) (google-research/simclr#77)
    c.distill.lr_scaling = "sqrt"  # peak 0.1 x sqrt(4096) = 6.4
    c.distill.weight_decay = 1e-4  # the pretraining's (google-research/simclr README)
    c.distill.warmup_epochs = 20.0  # 5% of the 400 epochs, as the pretraining's 5%
    c.distill.augment = True  # random resized crop + flip on device (the paper's only ones)
    c.distill.eval_every_epochs = 50.0  # top-1 / top-5 on the 50k validation images
    return c
