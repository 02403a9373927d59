"""CamVid on 2 CPU cores: a teacher and the student alone trained until their validation mIoU
stops rising, and ten distillation methods trained as long, 3 seeds each, at equal steps and at
equal time.

A CPU-sized protocol on the real CamVid data (367 train / 101 val images, 480×360, 11 classes,
label 11 = void); results, their discussion and the wall time are in benchmarks/camvid/RESULTS.md.
Run from the project root, with the data in ../shared/data/camvid (the TFDS dataset is built from
it on first use):

    kdjax compare --config=configs/camvid/compare.py --workdir=runs/camvid

and the time-matched comparison of the same methods, every student held to the student alone's
measured training time (each schedule stretched to the steps it affords), with the teacher trained
above:

    kdjax compare --config=configs/camvid/compare.py --workdir=runs/camvid/seconds \
        --config.budget=seconds:student_alone --config.teacher.checkpoint=runs/camvid/teacher/model

`make camvid` runs both and resumes an interrupted run where it stopped.

Protocol:
- Half resolution: training images are scaled so that the short side is 180 × U(0.5, 2.0), then
  cropped to 128×128 and flipped; validation images are predicted whole at half scale (240×180) and
  scored against the full-resolution 480×360 labels.
- Networks, trained from scratch (no ImageNet weights exist offline): teacher DeepLabV3-ResNet18 at
  half width (head 64), 4,000 steps; student DeepLabV3-ResNet18 at quarter width (head 32), about a
  quarter of the teacher's parameters and FLOPs, 2,000 steps (about 44 epochs at batch 8). Both at
  output stride 8 with the FCN aux head, SGD lr 0.05, momentum 0.9, wd 1e-4, poly 0.9, gradient
  norm clipped at 10, batch 8.
- Validation every 250 steps, so each run's curve (``curves.png``) shows where it plateaus.
- Methods and loss weights: docs/methods.md §5 and §9 through
  ``kdjax.config.methods.method_terms``; CWD is the CWD paper's logits-only recipe (weight 3, τ 4),
  and FAKD-CWD augments that one.
- Every student run uses the same trained teacher; the last checkpoint is reported (no selection on
  the validation set).

The earlier protocol (the same networks, the teacher 800 steps and every student 120) is kept as
history in benchmarks/camvid/RESULTS.md. ``:local`` shrinks it to a CPU smoke test on the built-in
synthetic data.
"""

import ml_collections

from kdjax.config.defaults import base_config
from kdjax.config.recipes import from_arg, method_terms

CAMVID_METHODS = ("student_alone", "kd", "cwd_logits", "nfd", "pfs_wpi", "fakd_kd", "fakd_cwd",
                  "dist", "cirkd", "af_dcd", "mgd")


def get_config(arg=None):
    return from_arg(arg, _camvid)


def _camvid():
    config = base_config()
    config.data.name = "camvid"
    config.data.manual_dir = "../shared/data/camvid"
    config.data.base_size = 180
    config.data.scale_range = (0.5, 2.0)
    config.data.crop_size = (128, 128)
    config.data.normalization = "imagenet"
    config.data.cache = True

    config.teacher.name = "deeplabv3_resnet18"
    config.teacher.width_multiplier = 0.5
    config.teacher.head_width = 64
    config.student.name = "deeplabv3_resnet18"
    config.student.width_multiplier = 0.25
    config.student.head_width = 32
    config.teacher_steps = 4000

    config.train.steps = 2000
    config.train.batch_size = 8
    config.train.learning_rate = 0.05
    # From scratch at lr 0.05, CWD's first gradients are ~10× CE's; one clip for every run.
    config.train.grad_clip = 10.0
    config.train.log_every = 50
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.eval.batch_size = 8
    config.eval.scales = (0.5,)
    config.eval.checkpoint = "last"

    config.methods = ml_collections.ConfigDict(
        {name: method_terms(name, aux_logits=True, dataset="camvid") for name in CAMVID_METHODS})
    # The official CamVid contrast crops the 45×45 c4 map of a 360×360 crop to 44×44 (whole 4×4
    # patches, no pooling); at half resolution the 128×128 crop's 16×16 map is whole patches as
    # it is.
    config.methods.af_dcd.af_dcd.options.update(dict(crop=None, pool=0))
    config.seeds = (0, 1, 2)
    return config
