"""The shared schema: every key all jobs and methods read, its default, and its validation.

Each method's own section (`config.<method>`) and its checks come from `simclr_jax/methods/`;
`simclr_jax.config_base` adds them (this layer is below the methods and never imports them).
The allowed values are the constants of the modules that own them (data, models, optim).
"""

from __future__ import annotations

import ml_collections

from simclr_jax import augment, models, optim
from simclr_jax.config.checks import ConfigError, check
from simclr_jax.config.moved import first_moved, moved_message
from simclr_jax.config.resume import flatten
from simclr_jax.data.datasets import DATASETS
from simclr_jax.data.pipeline import MAX_BAD_FRACTION, READ_THREADS
from simclr_jax.data.text_eval_data import PROBE_TASKS, STS_TASKS

# Facts of the schema itself (no lower module owns them).
WIDTH_MULTIPLIERS = (1, 2, 3, 4)  # the SimCLR (v2) ResNet widths
LINEAR_MODES = ("features", "streamed")  # eval.linear_mode: the end-of-run probe's two paths
DOWNSTREAM_OPTIMIZERS = ("sgd", "lars")  # linear_eval.optimizer and finetune.optimizer
DOWNSTREAM_SECTIONS = ("linear_eval", "finetune", "distill")  # sections with the same training keys
DISTILL_STUDENTS = ("teacher", "model")  # distill.student: the teacher's encoder or config.model
TEACHER_SHARDINGS = ("auto", "replicated", "sharded")  # distill.shard_teacher
IMAGE_SIZE = 224  # ImageNet's: data.image_size and augment.image_size by default


def shared_config() -> ml_collections.ConfigDict:
    """Every shared key with SimCLR ImageNet defaults (no method sections); configs override."""
    c = ml_collections.ConfigDict()
    c.method = "simclr"  # the objective, a registered name (simclr_jax/methods/, docs/methods.md)
    c.seed = 0  # the one root seed: every PRNG key derives from it with fold_in
    c.dataset = "digits"  # one of DATASETS
    c.batch_size = 256  # GLOBAL batch over all devices and hosts (2x this many views)
    c.num_epochs = 100.0  # run length in epochs of the pretraining split ...
    c.total_steps = 0  # ... unless > 0, which overrides num_epochs
    c.log_every_steps = 50  # metrics come back to the host only this often
    c.checkpoint_every_steps = 1000  # orbax save cadence (and always at the end)
    c.keep_checkpoints = 3  # keep the newest N checkpoints ...
    c.keep_period = 0  # ... plus every step divisible by this (0: none)
    c.init_from = ""  # export directory to start from (finetune / linear_eval modes)
    c.monitor_every_steps = 0  # align/uniform/rankme cadence (0: every log step)

    c.data = ml_collections.ConfigDict()
    c.data.image_size = IMAGE_SIZE  # side of the images the host yields
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir
    c.data.manual_dir = ml_collections.config_dict.placeholder(str)  # imagenet2012 tars
    c.data.folder = ml_collections.config_dict.placeholder(str)  # image_folder root
    c.data.host_crop = False  # random-resized-crop on the host at decode (large images)
    # With host_crop: 0 = the host resizes both views to image_size; H > 0 = it resizes the
    # union of the two crop windows to H x H once and the device cuts the views out of it.
    c.data.host_size = 0
    c.data.prefetch = 2  # batches prepared ahead by a background thread
    c.data.num_threads = 0  # tf.data decode threads (0: autotune)
    c.data.read_threads = READ_THREADS  # Grain threads reading records of streamed datasets
    # Streamed data: undecodable files are skipped (and replaced) up to this fraction of those
    # read; more stop the run naming the first ones (docs/data.md).
    c.data.max_bad_fraction = MAX_BAD_FRACTION
    c.data.eval_max_examples = 0  # cap on examples read for evaluation (0: all)
    # Text datasets (dataset = 'text_file', 'lee_news', 'tfds_text', 'hf_text'; docs/data.md).
    c.data.text_files = ml_collections.config_dict.placeholder(str)  # file, glob or folder of *.txt
    c.data.tfds_name = ml_collections.config_dict.placeholder(str)  # tfds_text: e.g. 'glue/sst2'
    c.data.hf_path = ml_collections.config_dict.placeholder(str)  # hf_text: save_to_disk dir/file
    c.data.text_field = "sentence"  # tfds_text / hf_text: the feature or column with the text
    c.data.text_split = "train"  # tfds_text / hf_text: the split pretrained on
    # The labelled text split the downstream jobs evaluate on (GLUE's labelled eval split).
    c.data.text_test_split = "validation"
    # A tokenizer.json. Pretraining: copied into a new run's workdir instead of training one ('':
    # train). Downstream jobs: the one to encode with ('': the encoder's own, beside its export).
    c.data.tokenizer = ""
    c.data.lowercase = True  # the tokenizer lowercases (and strips accents), as BERT uncased
    # Examples the tokenizer is trained on, evenly spaced over the split (0: all of them).
    c.data.tokenizer_train_examples = 0

    c.augment = augment.default_augment_config(IMAGE_SIZE)  # the keys and defaults: augment.py

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet"  # the encoder: 'resnet' (the keys below), 'vit' or 'text' (models.md)
    # ViT keys (model.name='vit'): big_vision's '<size>/<patch>' (Ti, S, B, L, ...; 'mu' for tests)
    c.model.variant = "B/16"
    c.model.pool = "tok"  # pooled feature: 'tok' (class token) or 'gap' (mean of patch tokens)
    c.model.posemb = "learn"  # 'learn' or 'sincos2d' (MoCo v3's fixed 2-D sin-cos)
    # Side of the learned position-embedding grid in patches (0: the input's); other inputs get
    # it resized. Exports record it, so an encoder evaluates at another image size.
    c.model.posemb_grid = 0
    # Text keys (model.name='text': variant is a size alone, 'mu', 'Ti', 'S', ...; pool as above)
    c.model.vocab_size = models.text.DEFAULT_VOCAB_SIZE  # token ids, the 6 special ones included
    c.model.max_len = models.text.DEFAULT_MAX_LEN  # tokens per example, [CLS] and [SEP] included
    # ResNet keys (model.name='resnet')
    c.model.depth = 50  # one of models.RESNET_LAYOUTS: 18, 34, 50, 101, 152, 200
    c.model.width_multiplier = 1  # 1, 2, 3, 4
    c.model.base_width = 64  # stem channels before the width multiplier (64 is standard)
    c.model.stem = "imagenet"  # 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1, no pool)
    c.model.zero_init_last_bn = False  # zero-init each residual branch's last BN scale
    c.model.sk_ratio = 0.0  # 0: plain ResNet; > 0 (0.0625 in SimCLR v2): SK-ResNet with ResNet-D
    # 'torchvision' or 'simclr_tf' (google-research/simclr's TF max-pool padding and stage-1
    # projection; set by --mode=import_official): see simclr_jax/models/resnet.py
    c.model.compat = "torchvision"
    c.model.head_layers = 2  # projection head depth: 2 SimCLRv1, 3 SimCLRv2
    c.model.head_hidden_dim = 2048
    c.model.head_out_dim = 128
    c.model.head_bn = True  # BN in every head layer (SimCLR v2)
    c.model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay fp32)
    # > 0: the encoder runs on every patch of a grid of patch_grid px patches at
    # patch_grid_stride and returns the mean patch feature (CPC; docs/methods.md). 0: whole image.
    c.model.norm = "batch"  # ResNet: 'batch' (global BN) or 'layer' (per-example, CPC v2)
    c.model.patch_grid = 0
    c.model.patch_grid_stride = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "lars"  # 'lars' (pretraining), 'sgd' or 'adamw' (fine-tuning)
    c.optim.base_lr = 0.3  # scaled by lr_scaling to the peak LR
    c.optim.lr_scaling = "linear"  # 'linear': base*B/256, 'sqrt': base*sqrt(B), 'none'
    c.optim.weight_decay = 1e-6
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 1e-3
    c.optim.warmup_epochs = 10.0
    c.optim.grad_clip_norm = 0.0  # 0: off
    c.optim.constant_lr_params = ()  # top-level modules kept at the peak LR (SimSiam: predictor)

    c.eval = ml_collections.ConfigDict()
    c.eval.at_end = True  # linear probe + kNN of random-init vs pretrained encoder
    c.eval.batch_size = 512  # feature-extraction batch (global)
    c.eval.knn_k = 200
    c.eval.knn_temperature = 0.1
    # End-of-run linear probe: config.linear_eval's protocol for this many epochs (a bounded
    # budget; data.eval_max_examples caps the examples it reads).
    c.eval.linear_epochs = 100.0
    c.eval.linear_batch_size = 256  # its global batch (the other keys: config.linear_eval)
    # 'features': the fast probe on centre-crop features extracted once (shared with the kNN);
    # 'streamed': the augmented --mode=linear_eval run, for eval.linear_epochs.
    c.eval.linear_mode = "features"
    # Text encoders (evals/text_eval.py): STS Spearman on this task's pairs and a logistic-
    # regression probe on this task's sentences, random init vs pretrained. 'lee' / 'polarity'
    # ship with gensim (offline); 'stsb' / 'sst2' are GLUE's through tfds.
    c.eval.sts_task = "lee"  # one of text_eval_data.STS_TASKS
    c.eval.probe_task = "polarity"  # one of text_eval_data.PROBE_TASKS

    # --mode=linear_eval: SimCLR's protocol (the ImageNet command: 90 epochs, batch 4096,
    # momentum SGD, LR 0.1 x B/256, no warm-up, weight decay 1e-6), on streamed data.
    c.linear_eval = ml_collections.ConfigDict()
    c.linear_eval.epochs = 90.0
    c.linear_eval.batch_size = 4096  # global; capped at the labelled examples
    c.linear_eval.optimizer = "sgd"  # 'sgd' (momentum, Nesterov) or 'lars'
    c.linear_eval.base_lr = 0.1  # peak LR = base_lr x B / 256 (lr_scaling='linear')
    c.linear_eval.lr_scaling = "linear"  # 'linear', 'sqrt' or 'none' (as optim.lr_scaling)
    c.linear_eval.momentum = 0.9
    c.linear_eval.weight_decay = 1e-6
    c.linear_eval.warmup_epochs = 0.0  # then cosine decay to 0
    c.linear_eval.augment = True  # random resized crop + flip on device (False: centre crops)
    c.linear_eval.knn = True  # also the weighted kNN (eval.knn_k, eval.knn_temperature)
    # True: the fast probe on centre-crop features extracted once (small datasets); False: the
    # protocol, streamed images with augmentation (the only choice for ImageNet-size data).
    c.linear_eval.precompute_features = False

    # --mode=finetune: SimCLR v2 semi-supervised fine-tuning, google-research/simclr README's
    # command for 1% of ImageNet ("--optimizer=lars --learning_rate=0.005
    # --learning_rate_scaling=sqrt --weight_decay=0 --train_epochs=60 --train_batch_size=1024
    # --warmup_epochs=0 --global_bn=True --ft_proj_selector=1"): peak 0.005 x sqrt(1024) = 0.16,
    # the paper's ResNet-50 value; 30 epochs on 10% of the labels (the paper, section 3.1).
    c.finetune = ml_collections.ConfigDict()
    c.finetune.label_fraction = 1.0  # class-balanced, seeded subset of the labels (0.01, 0.1)
    c.finetune.subset = ""  # '1pct' / '10pct': ImageNet's official subsets; or a file of names
    c.finetune.from_head_layer = 0  # 0: encoder features; k: after k projection-head layers
    c.finetune.eval_every_epochs = 0.0  # test top-1/top-5 every so many epochs (0: at the end)
    c.finetune.epochs = 60.0
    c.finetune.batch_size = 1024  # global; capped at the labelled examples
    c.finetune.optimizer = "lars"  # 'lars' or 'sgd' (momentum, Nesterov)
    c.finetune.base_lr = 0.005  # x sqrt(B): 0.16 at batch 1024
    c.finetune.lr_scaling = "sqrt"
    c.finetune.momentum = 0.9
    c.finetune.weight_decay = 0.0
    c.finetune.warmup_epochs = 0.0  # linear warm-up, then cosine decay over finetune.epochs
    c.finetune.augment = True  # random resized crop + flip on device

    # --mode=distill: SimCLR v2's third step (Chen et al. 2020, arXiv 2006.10029, section 3.1):
    # a student learns the fine-tuned teacher's softmax(logits / T) on the unlabelled train
    # images only, LARS (momentum 0.9), T = 0.1 for self-distillation and 1.0 for big-to-small,
    # 400 epochs, random crop + flip only. The LR, weight decay and batch are the pretraining's
    # (our reading of the paper; not checked against its text here): peak 0.1 x sqrt(B) after a
    # 5% warm-up (the authors in google-research/simclr#77), weight decay 1e-4 (that README's
    # pretraining command), batch 4096. google-research/simclr ships no distillation training.
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # a fine-tune run's workdir, or an export with a classifier head
    # The projection-head layer the teacher's classifier reads: -1 = what the teacher records (a
    # fine-tune run's from_head_layer; an export's pooled features). Google's fine-tuned v2
    # releases were fine-tuned from head layer 1 (their README's command): pass 1 for them.
    c.distill.teacher_head_layer = -1
    c.distill.student = "teacher"  # its encoder (self-distillation); 'model': config.model
    c.distill.temperature = 0.1  # T of both softmaxes (the paper: 0.1 self, 1.0 big-to-small)
    # w in (1 - w) x distillation + w x cross-entropy on finetune's labelled subset (the paper's
    # equation 3 with alpha = 1 - w); 0: the unlabelled images only.
    c.distill.label_weight = 0.0
    c.distill.eval_every_epochs = 0.0  # the student's test top-1/top-5 (0: at the end)
    c.distill.epochs = 400.0
    c.distill.batch_size = 4096  # global; capped at the train images
    c.distill.optimizer = "lars"  # 'lars' or 'sgd' (momentum, Nesterov)
    c.distill.base_lr = 0.1
    c.distill.lr_scaling = "sqrt"
    c.distill.momentum = 0.9
    c.distill.weight_decay = 1e-4
    c.distill.warmup_epochs = 20.0  # 5% of the 400 epochs, then cosine decay
    c.distill.augment = True  # random resized crop + flip on device (both nets see the same view)
    # True: the teacher's logits are computed once per train image into WORKDIR/teacher_cache/
    # and read by the step instead of its forward (small datasets). Needs augment=False: a
    # cache holds one view per image, and with crops the teacher must see the student's view.
    c.distill.cache_teacher = False
    # The teacher's variables on the mesh: 'replicated', 'sharded' (FSDP-style over 'data',
    # gathered by XLA in the forward) or 'auto' (sharded when larger than 1 GiB).
    c.distill.shard_teacher = "auto"

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # call jax.distributed.initialize (auto on TPU VM / SLURM)
    c.distributed.coordinator_address = ""  # host:port; empty: auto-detect
    c.distributed.num_processes = 0  # 0: auto-detect
    c.distributed.process_id = -1  # -1: auto-detect
    c.distributed.initialization_timeout = 300  # seconds before a missing coordinator fails
    return c


def _one_of(values: object) -> str:
    return "/".join(str(v) for v in values)


def check_moved(c: ml_collections.ConfigDict) -> None:
    """Refuses a config that still sets a moved key (an unlocked ConfigDict takes any new key)."""
    old = first_moved(flatten(c.to_dict()))
    if old is not None:
        raise ConfigError(moved_message(old))


def validate_shared(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the key, its value and what is allowed, for a bad shared value."""
    check_moved(c)
    check(c.dataset in DATASETS, "dataset", c.dataset, f"one of {list(DATASETS)}")
    for key in ("batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        check(isinstance(c[key], int) and c[key] > 0, key, c[key], "a positive integer")
    check(c.total_steps >= 0, "total_steps", c.total_steps, ">= 0 (0: use num_epochs)")
    check(c.num_epochs > 0 or c.total_steps > 0, "num_epochs", c.num_epochs, "> 0")
    check(c.monitor_every_steps >= 0, "monitor_every_steps", c.monitor_every_steps, ">= 0")
    check(c.keep_period >= 0, "keep_period", c.keep_period, ">= 0")
    check(
        c.distributed.initialization_timeout > 0,
        "distributed.initialization_timeout",
        c.distributed.initialization_timeout,
        "> 0 seconds",
    )
    _validate_data_and_augment(c)
    _validate_model(c.model)
    if c.model.name == "vit":
        _validate_vit(c.model, c.augment.image_size)
    if c.model.name == "text":
        try:
            models.check_text_config(c.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    o = c.optim
    check(o.name in optim.OPTIMIZERS, "optim.name", o.name, _one_of(optim.OPTIMIZERS))
    check(o.base_lr > 0, "optim.base_lr", o.base_lr, "> 0")
    check(
        o.lr_scaling in optim.LR_SCALINGS,
        "optim.lr_scaling",
        o.lr_scaling,
        _one_of(optim.LR_SCALINGS),
    )
    check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, ">= 0")
    _validate_downstream(c)
    check(c.eval.linear_epochs > 0, "eval.linear_epochs", c.eval.linear_epochs, "> 0")
    check(
        isinstance(c.eval.linear_batch_size, int) and c.eval.linear_batch_size > 0,
        "eval.linear_batch_size",
        c.eval.linear_batch_size,
        "a positive integer",
    )
    check(
        c.eval.linear_mode in LINEAR_MODES,
        "eval.linear_mode",
        c.eval.linear_mode,
        f"one of {list(LINEAR_MODES)}",
    )
    check(c.eval.knn_k > 0, "eval.knn_k", c.eval.knn_k, "> 0")
    check(c.eval.sts_task in STS_TASKS, "eval.sts_task", c.eval.sts_task, _one_of(STS_TASKS))
    check(
        c.eval.probe_task in PROBE_TASKS,
        "eval.probe_task",
        c.eval.probe_task,
        _one_of(PROBE_TASKS),
    )
    check(c.eval.batch_size > 0, "eval.batch_size", c.eval.batch_size, "> 0")


def _validate_data_and_augment(c: ml_collections.ConfigDict) -> None:
    check(c.data.image_size > 0, "data.image_size", c.data.image_size, "> 0")
    check(c.data.prefetch >= 0, "data.prefetch", c.data.prefetch, ">= 0")
    check(c.data.read_threads >= 1, "data.read_threads", c.data.read_threads, ">= 1")
    _validate_text_data(c)
    check(
        0 <= c.data.max_bad_fraction < 1,
        "data.max_bad_fraction",
        c.data.max_bad_fraction,
        "in [0, 1) (0: any undecodable file stops the run)",
    )
    check(
        c.data.host_size == 0 or (c.data.host_crop and c.data.host_size >= c.data.image_size),
        "data.host_size",
        c.data.host_size,
        f"0, or with data.host_crop=True at least data.image_size={c.data.image_size}",
    )
    check(c.augment.image_size > 0, "augment.image_size", c.augment.image_size, "> 0")
    check(
        c.augment.crop or c.augment.image_size == c.data.image_size,
        "augment.image_size",
        c.augment.image_size,
        f"equal to data.image_size={c.data.image_size} when augment.crop is False",
    )
    try:  # the section's own rules live with the augmentations
        augment.validate_augment_config(c.augment)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate_text_data(c: ml_collections.ConfigDict) -> None:
    d = c.data
    for key in ("text_field", "text_split", "text_test_split"):
        check(isinstance(d[key], str) and d[key] != "", f"data.{key}", d[key], "a non-empty name")
    check(isinstance(d.tokenizer, str), "data.tokenizer", d.tokenizer, "a path or ''")
    check(
        d.tokenizer_train_examples >= 0,
        "data.tokenizer_train_examples",
        d.tokenizer_train_examples,
        ">= 0 (0: every example)",
    )
    # The key a text dataset cannot do without (where it points is checked when it is read).
    needs = {"text_file": "text_files", "tfds_text": "tfds_name", "hf_text": "hf_path"}
    key = needs.get(c.dataset)
    if key is not None:
        check(bool(d[key]), f"data.{key}", d[key], f"set for dataset={c.dataset!r}")


def _validate_model(m: ml_collections.ConfigDict) -> None:
    check(m.name in models.ENCODERS, "model.name", m.name, _one_of(models.ENCODERS))
    depths = sorted(models.RESNET_LAYOUTS)
    check(m.depth in models.RESNET_LAYOUTS, "model.depth", m.depth, _one_of(depths))
    check(
        m.width_multiplier in WIDTH_MULTIPLIERS,
        "model.width_multiplier",
        m.width_multiplier,
        _one_of(WIDTH_MULTIPLIERS),
    )
    check(0 <= m.sk_ratio <= 1, "model.sk_ratio", m.sk_ratio, "in [0, 1] (0.0625: SimCLR v2)")
    check(m.compat in models.COMPATS, "model.compat", m.compat, _one_of(models.COMPATS))
    check(m.base_width > 0, "model.base_width", m.base_width, "> 0")
    check(m.stem in models.STEMS, "model.stem", m.stem, _one_of(models.STEMS))
    check(m.head_layers >= 1, "model.head_layers", m.head_layers, ">= 1")
    check(m.dtype in models.DTYPES, "model.dtype", m.dtype, _one_of(models.DTYPES))
    check(m.norm in models.NORMS, "model.norm", m.norm, _one_of(models.NORMS))
    check(m.patch_grid >= 0, "model.patch_grid", m.patch_grid, ">= 0 (0: whole image)")
    check(
        m.patch_grid == 0 or m.patch_grid_stride > 0,
        "model.patch_grid_stride",
        m.patch_grid_stride,
        "> 0 with a patch grid",
    )


def _validate_vit(m: ml_collections.ConfigDict, image_size: int) -> None:
    try:
        (width, *_), patch = models.parse_variant(m.variant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check(m.pool in models.POOLS, "model.pool", m.pool, _one_of(models.POOLS))
    check(m.posemb in models.POSEMBS, "model.posemb", m.posemb, _one_of(models.POSEMBS))
    check(
        m.posemb != "sincos2d" or width % 4 == 0,
        "model.posemb",
        m.posemb,
        f"'learn' for {m.variant} (sin-cos needs a width divisible by 4, it has {width})",
    )
    check(m.posemb_grid >= 0, "model.posemb_grid", m.posemb_grid, ">= 0 (0: the input's grid)")
    check(
        image_size % patch == 0,
        "augment.image_size",
        image_size,
        f"a multiple of model.variant={m.variant!r}'s patch {patch}",
    )


def _validate_downstream(c: ml_collections.ConfigDict) -> None:
    f = c.finetune
    check(0 < f.label_fraction <= 1, "finetune.label_fraction", f.label_fraction, "in (0, 1]")
    check(f.from_head_layer >= 0, "finetune.from_head_layer", f.from_head_layer, ">= 0")
    check(f.eval_every_epochs >= 0, "finetune.eval_every_epochs", f.eval_every_epochs, ">= 0")
    check(
        not (f.subset and f.label_fraction < 1),
        "finetune.label_fraction",
        f.label_fraction,
        f"1.0 with finetune.subset={f.subset!r} (a subset already picks the labels)",
    )
    d = c.distill
    check(d.temperature > 0, "distill.temperature", d.temperature, "> 0")
    check(0 <= d.label_weight < 1, "distill.label_weight", d.label_weight, "in [0, 1)")
    check(d.student in DISTILL_STUDENTS, "distill.student", d.student, _one_of(DISTILL_STUDENTS))
    check(d.teacher_head_layer >= -1, "distill.teacher_head_layer", d.teacher_head_layer, ">= -1")
    check(d.eval_every_epochs >= 0, "distill.eval_every_epochs", d.eval_every_epochs, ">= 0")
    check(
        not (d.cache_teacher and d.augment),
        "distill.cache_teacher",
        d.cache_teacher,
        "False with distill.augment=True (the teacher must see each step's crop; set "
        "distill.augment=False to cache its predictions on the centre view)",
    )
    check(
        d.shard_teacher in TEACHER_SHARDINGS,
        "distill.shard_teacher",
        d.shard_teacher,
        _one_of(TEACHER_SHARDINGS),
    )
    for name in DOWNSTREAM_SECTIONS:
        s = c[name]
        check(s.epochs > 0, f"{name}.epochs", s.epochs, "> 0")
        check(
            isinstance(s.batch_size, int) and s.batch_size > 0,
            f"{name}.batch_size",
            s.batch_size,
            "a positive integer",
        )
        check(
            s.optimizer in DOWNSTREAM_OPTIMIZERS,
            f"{name}.optimizer",
            s.optimizer,
            f"one of {list(DOWNSTREAM_OPTIMIZERS)}",
        )
        check(s.base_lr > 0, f"{name}.base_lr", s.base_lr, "> 0")
        check(
            s.lr_scaling in optim.LR_SCALINGS,
            f"{name}.lr_scaling",
            s.lr_scaling,
            _one_of(optim.LR_SCALINGS),
        )
        check(s.weight_decay >= 0, f"{name}.weight_decay", s.weight_decay, ">= 0")
        check(s.warmup_epochs >= 0, f"{name}.warmup_epochs", s.warmup_epochs, ">= 0")
