"""The demo: distillation on the built-in synthetic street scenes, a few minutes on 2 CPU cores.

A DeepLabV3-ResNet18 teacher (3/8 width, output stride 8) is trained first, then a
DeepLabV3-ResNet18 student (quarter width, output stride 16, no aux head; about a fifth of the
teacher's compute) alone and with CWD, NFD, PFS + WPI and FAKD, all under one recipe and seed,
and every model is evaluated on the same validation scenes. Each term resizes the teacher's
tensors to the student's size (``resize``).

The sizes are chosen for 2 CPU cores (``benchmarks/NOTES.md`` items 44–48):
- the student is a ResNet rather than MobileNetV2, whose 52 convolutions compile about 1.5× and
  step about 4× slower there;
- at output stride 16 the student's train step compiles in about half the time and steps in
  about 60 % of it, and its mIoU after 50 steps is the same as at 8, while the teacher at 16
  loses about 10 of its 33 points;
- the teacher at 3/8 width steps in about 55 % of its time at half width and ends within a point
  of it.

    kdjax compare --config=configs/demo.py --workdir=runs/demo      # or: make demo

Expect the teacher to lead the student alone by several mIoU points; how much each method closes
of that gap at this tiny scale varies with the seed (run more with --config.seeds='(0,1,2)').
"""

import ml_collections

from kdjax.config.defaults import base_config
from kdjax.config.recipes import from_arg, method_terms

DEMO_METHODS = ("student_alone", "cwd_logits", "nfd", "pfs_wpi", "fakd_kd")


def get_config(arg=None):
    return from_arg(arg, _demo)


def _demo():
    config = base_config()
    config.data.name = "synthetic"
    config.data.synthetic.num_train = 512
    config.data.synthetic.num_val = 24
    config.data.synthetic.height = 64
    config.data.synthetic.width = 128
    config.data.crop_size = (64, 128)
    config.data.normalization = "imagenet"
    # Render the scenes once per process: every run of the comparison reads the same ones.
    config.data.cache = True

    config.teacher.name = "deeplabv3_resnet18"
    config.teacher.width_multiplier = 0.375
    config.teacher.head_width = 64
    config.student.name = "deeplabv3_resnet18"
    config.student.width_multiplier = 0.25
    config.student.head_width = 32
    config.student.output_stride = 16
    config.student.aux = False
    config.teacher_steps = 200

    config.train.steps = 50
    config.train.batch_size = 8
    config.train.learning_rate = 0.05
    config.train.log_every = 25
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    config.eval.batch_size = 8
    config.eval.checkpoint = "last"

    config.methods = ml_collections.ConfigDict(
        {name: _teacher_resized(method_terms(name, aux_logits=False)) for name in DEMO_METHODS})
    config.seeds = (0,)
    return config


def _teacher_resized(terms: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``terms`` with the teacher's tensors resized to the student's: the teacher's logits and
    head feature are twice the student's size (output stride 8 against 16)."""
    for term in terms.values():
        term.resize = "teacher_to_student"
    return terms
