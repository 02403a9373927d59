"""The demo: distillation on the built-in synthetic street scenes, a few minutes on 2 CPU cores.

A DeepLabV3-ResNet18 teacher (half width) is trained first, then a DeepLabV3-ResNet18 student
(quarter width, about a quarter of the teacher's compute) alone and with CWD, NFD, PFS + WPI and
FAKD, all under one recipe and seed, and every model is evaluated on the same validation scenes.
The student is a ResNet rather than MobileNetV2 for the CPU's sake: MobileNetV2's 52 convolutions
compile about 1.5× and step about 4× slower on 2 cores (``benchmarks/RESULTS.md``, the demo).

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
    config.teacher.width_multiplier = 0.5
    config.teacher.head_width = 64
    config.student.name = "deeplabv3_resnet18"
    config.student.width_multiplier = 0.25
    config.student.head_width = 32
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
        {name: method_terms(name, aux_logits=False) for name in DEMO_METHODS})
    config.seeds = (0,)
    return config
