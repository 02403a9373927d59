"""Cityscapes, CIRKD benchmark protocol: DeepLabV3-ResNet101 → DeepLabV3-ResNet18 or -MobileNetV2.

The protocol of docs/methods.md §6.1: 512×1024 crops, batch 16, 40k steps, SGD 0.02, weight decay
1e-4, best checkpoint by whole-image single-scale val mIoU (evaluated every 800 steps). The argument
picks the student (`r18`, `mbv2`) and the method (any of `kdjax.config.recipes.METHODS`); ROWS below
lists the published rows with their expected val mIoU (docs/methods.md §7.1). A row runs as

    kdjax compare --config=configs/cityscapes.py:student=STUDENT,method=METHOD \\
        --workdir=runs/cityscapes_STUDENT_METHOD \\
        --config.teacher.checkpoint=TEACHER_DIR \\
        --config.student.backbone_checkpoint=IMAGENET_PTH

for example `--config=configs/cityscapes.py:student=r18,method=cwd` (expected 75.55; student alone
74.21, teacher 78.07).

TEACHER_DIR is a DeepLabV3-ResNet101 model dir (`kdjax convert --model=deeplabv3_resnet101
--num-classes=19 --torch=teacher.pth --out=TEACHER_DIR`). IMAGENET_PTH: the student backbone's
ImageNet weights (CIRKD's deep-stem `resnet18-imagenet.pth` or `mobilenetv2-imagenet.pth`), which
the published numbers start from. Smoke test: add `,local` to the argument.
"""

from kdjax.config.recipes import METHODS, STUDENTS, Row, cirkd_recipe, from_arg, paper_row

CIRKD = "CIRKD README, docs/methods.md §7.1"
UNPUBLISHED = "none published in this protocol (docs/methods.md §7.1 lists it as unconfirmed)"
DIST_REPO = "DIST's own repository under the CIRKD protocol, which uses weight decay 5e-4"
AF_DCD = "Af-DCD paper (NeurIPS 2023), CIRKD protocol, docs/methods.md §10"
NOT_IN_PROTOCOL = "none published under this protocol (docs/methods.md §11, §12)"
TEACHER = 78.07
ALONE = {"r18": 74.21, "mbv2": 73.12}
# (student, method, expected val mIoU of the distilled student, where it comes from)
PUBLISHED = (
    ("r18", "kd", None, UNPUBLISHED),
    ("r18", "cwd", 75.55, CIRKD),
    ("r18", "nfd", None, UNPUBLISHED),
    ("r18", "pfs_wpi", None, UNPUBLISHED),
    ("r18", "fakd_kd", None, UNPUBLISHED),
    ("r18", "fakd_cwd", None, UNPUBLISHED),
    ("r18", "skd", 75.42, CIRKD),
    ("r18", "ifvd", 75.59, CIRKD),
    ("r18", "cirkd", 76.38, CIRKD),
    ("r18", "dist", 77.10, DIST_REPO),
    ("r18", "at", None, UNPUBLISHED),
    ("r18", "fitnet", None, UNPUBLISHED),
    ("r18", "af_dcd", 77.03, AF_DCD),
    ("r18", "mgd", None, UNPUBLISHED),
    ("r18", "cirkdv2", None, NOT_IN_PROTOCOL),
    ("r18", "bpkd", None, NOT_IN_PROTOCOL),
    ("mbv2", "kd", None, UNPUBLISHED),
    ("mbv2", "cwd", 74.66, CIRKD),
    ("mbv2", "nfd", None, UNPUBLISHED),
    ("mbv2", "pfs_wpi", None, UNPUBLISHED),
    ("mbv2", "fakd_kd", None, UNPUBLISHED),
    ("mbv2", "fakd_cwd", None, UNPUBLISHED),
    ("mbv2", "skd", 73.82, CIRKD),
    ("mbv2", "ifvd", 73.50, CIRKD),
    ("mbv2", "cirkd", 75.42, CIRKD),
    ("mbv2", "dist", None, UNPUBLISHED),
    ("mbv2", "at", None, UNPUBLISHED),
    ("mbv2", "fitnet", None, UNPUBLISHED),
    ("mbv2", "af_dcd", 76.43, AF_DCD),
    ("mbv2", "mgd", None, UNPUBLISHED),
    ("mbv2", "cirkdv2", None, NOT_IN_PROTOCOL),
    ("mbv2", "bpkd", None, NOT_IN_PROTOCOL),
)
ROWS = tuple(Row(student, method, expected, ALONE[student], TEACHER, source)
             for student, method, expected, source in PUBLISHED)


def get_config(arg=None):
    return from_arg(arg, _experiment, student=STUDENTS, method=METHODS)


def _experiment(student, method):
    config = cirkd_recipe("cityscapes", student=f"deeplabv3_{STUDENTS[student]}")
    if (student, method) == ("r18", "dist"):
        config.train.weight_decay = 5e-4  # as the code behind the published 77.10
    return paper_row(config, method)
