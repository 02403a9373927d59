"""Every config field kdjax reads, with its default; configs in ``configs/`` start from
:func:`base_config` and change what their experiment needs."""

from __future__ import annotations

import ml_collections

from kdjax.config.data_defaults import default_data_config

ConfigDict = ml_collections.ConfigDict


def model_config(name: str, **overrides) -> ConfigDict:
    """A network: a ``kdjax.models.build_segmentor`` name and its options."""
    config = ConfigDict()
    config.name = name                # e.g. 'deeplabv3_resnet18', 'pspnet_resnet101'
    config.variant = "cirkd"          # ResNet layout: 'cirkd' (deep stem) or 'torchvision'
    config.output_stride = 8          # 8 or 16
    config.head_width = None          # None = CIRKD's current layout; 128/256 = paper-era heads
    config.aux = None                 # FCN aux head on c3; None = ResNets yes, MobileNetV2 no
    config.width_multiplier = 1.0     # backbone channel widths ×; 1.0 = the published backbone
    config.checkpoint = None          # a model dir written by `kdjax convert` / training; None = init
    # An ImageNet state dict (.pth, needs PyTorch) for the backbone only, as the published
    # students start from; backbone_source is its layout: 'cirkd' (deep stem) or 'torchvision'.
    config.backbone_checkpoint = None
    config.backbone_source = "cirkd"
    config.dtype = "float32"          # compute dtype: 'float32' or 'bfloat16' (params stay float32)
    # Convolution and batch-norm forms: 'auto' (the CPU forms on CPU, the GPU forms on GPUs, plain
    # XLA elsewhere), 'xla', 'cpu' or 'gpu' (kdjax/ops/kernels.py). Not part of the model: a run
    # may change it.
    config.kernels = "auto"
    config.update(overrides)
    return config


def base_config() -> ConfigDict:
    config = ConfigDict()
    config.seed = 0                   # seed of initialisation, data order, augmentation, dropout
    config.seeds = (0,)               # `kdjax compare`: one student run per seed and method
    config.data = default_data_config()

    config.student = model_config("deeplabv3_resnet18")
    config.teacher = model_config("deeplabv3_resnet101")
    # `kdjax compare` trains the teacher when teacher.checkpoint is None, with this many steps
    # (None = train.steps) and otherwise the student recipe.
    config.teacher_steps = None
    # `kdjax compare`: 'steps' (every run trains train.steps), or a matched budget every student
    # run is held to: 'seconds:S', 'flops:F', or 'seconds:student_alone' / 'flops:student_alone'
    # (the student alone's cost at train.steps). See kdjax/training/budget.py.
    config.budget = "steps"

    config.train = ConfigDict()
    config.train.steps = 40000        # optimizer steps
    config.train.batch_size = 16      # global batch size (all devices of all processes)
    config.train.optimizer = "sgd"    # 'sgd' (momentum, coupled L2 as PyTorch) or 'adamw'
    config.train.learning_rate = 0.02  # peak learning rate
    config.train.momentum = 0.9
    config.train.weight_decay = 1e-4
    config.train.poly_power = 0.9     # lr · (1 − step/steps)^power (the benchmark protocol)
    config.train.warmup_steps = 0     # linear warm-up before the poly decay
    config.train.grad_clip = None     # global-norm clipping threshold, None = off
    config.train.aux_weight = 0.4     # weight of the aux-head CE (ResNet students)
    config.train.log_every = 50       # steps between metric logs (and non-finite checks)
    config.train.eval_every = 4000    # steps between validation runs (and at the end)
    config.train.checkpoint_every = 2000  # steps between checkpoints (and at the end)
    config.train.keep_checkpoints = 3  # last k checkpoints kept, plus the best by val mIoU
    config.train.async_checkpoints = True
    config.train.bn_stats = "global"  # 'global' (synchronised BN) or 'per_device'
    # 'bfloat16': student and teacher compute in bfloat16 (convolutions, matmuls, activations);
    # parameters, optimizer state, BN statistics, softmaxes and loss reductions stay float32.
    # 'float32': each network computes in its own `dtype` (float32 by default).
    config.train.precision = "float32"
    config.train.profile_steps = None  # (start, stop): a jax.profiler trace of those steps

    config.eval = ConfigDict()
    config.eval.batch_size = 8        # global eval batch size
    config.eval.mode = "whole"        # 'whole' or 'slide'
    config.eval.crop_size = None      # slide window (H, W)
    config.eval.stride = None         # slide stride (H, W)
    config.eval.scales = (1.0,)       # multi-scale inference scales
    config.eval.flip = False          # average with the horizontally flipped image
    config.eval.checkpoint = "best"   # which checkpoint a run reports: 'best' or 'last'
    config.eval.max_batches = None    # evaluate only the first batches (smoke tests)
    config.eval.overlays = 4          # PNG overlays written by `kdjax eval`

    config.distill = ConfigDict()
    # Named terms (see kdjax/distill/terms.py), e.g. terms.cwd = ConfigDict(dict(loss=..., ...)).
    # Its reserved key `student_modules` declares trainable modules on a student tensor whose
    # outputs the terms can read, e.g. terms.student_modules.head_gcn = ConfigDict(dict(
    # module='gcn', input='head')) and terms.fitnet.student = 'head_gcn'.
    config.distill.terms = ConfigDict()
    # The scratch budget of the losses that loop over chunks (FAKD-CWD, Af-DCD's contrast), in
    # MiB: 'auto' (16 on CPU, 256 elsewhere; kdjax/ops/kernels.py), a number, or None (no loop).
    # Not part of the recipe: a run may change it.
    config.distill.loss_scratch_mb = "auto"

    # `kdjax compare`: method name → its distillation terms; 'student_alone' has none.
    config.methods = ConfigDict()

    config.distributed = ConfigDict()
    config.distributed.coordinator_address = None  # 'host:port'; None = detect (SLURM, TPU pod)
    config.distributed.num_processes = None
    config.distributed.process_id = None
    return config


def local_run(config: ConfigDict) -> ConfigDict:
    """The ``:local`` small-run switch: the same experiment shrunk to a CPU smoke test: tiny
    synthetic data, small crops, a few steps, and the same architectures at a quarter of their
    widths; the distillation terms are kept."""
    for model in (config.student, config.teacher):
        model.width_multiplier = 0.25
        model.head_width = 32
    config.data.name = "synthetic"
    config.data.builder_config = None
    config.data.crop_size = (64, 64)
    config.data.synthetic.num_train = 8
    config.data.synthetic.num_val = 2
    config.data.synthetic.height = 64
    config.data.synthetic.width = 96
    config.train.steps = 2
    config.train.batch_size = 8  # a multiple of any device count up to 8
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.eval.batch_size = 8
    config.eval.mode = "whole"
    config.eval.scales = (1.0,)
    config.eval.flip = False
    config.teacher_steps = 2
    config.seeds = (0,)
    return config
