"""Cityscapes, CWD paper protocol: PSPNet-ResNet101 → PSPNet-ResNet18 or -MobileNetV2.

The protocol of docs/methods.md §6.2: 512×512 crops, batch 8, 40k steps, SGD 0.01, weight decay
5e-4, the last checkpoint evaluated whole-image single-scale. The argument picks the student (`r18`,
`mbv2`) and the method (any of `kdjax.config.recipes.METHODS`); ROWS below lists the published row,
CWD on logits (`cwd_logits`: weight 3, τ 4). A row runs as

    kdjax compare --config=configs/cityscapes_pspnet.py:student=STUDENT,method=METHOD \\
        --workdir=runs/cityscapes_pspnet_STUDENT_METHOD \\
        --config.teacher.checkpoint=TEACHER_DIR \\
        --config.student.backbone_checkpoint=IMAGENET_PTH

for example `--config=configs/cityscapes_pspnet.py:student=r18,method=cwd_logits` (expected 74.87,
the mean of 3 runs; student alone 69.10, teacher 78.56).

TEACHER_DIR: a PSPNet-ResNet101 model dir from `kdjax convert --model=pspnet_resnet101
--num-classes=19 --torch=teacher.pth --out=TEACHER_DIR`. IMAGENET_PTH: the student backbone's
ImageNet weights (CIRKD's deep-stem `resnet18-imagenet.pth` or `mobilenetv2-imagenet.pth`), which
the published numbers start from. Smoke test: add `,local` to the argument.
"""

from kdjax.config.recipes import METHODS, STUDENTS, Row, cwd_paper_recipe, from_arg, paper_row

ROWS = (Row("r18", "cwd_logits", 74.87, alone=69.10, teacher=78.56,
            source="CWD paper Table 2, mean of 3 runs; docs/methods.md §7.2"),)


def get_config(arg=None):
    return from_arg(arg, _experiment, student=STUDENTS, method=METHODS)


def _experiment(student, method):
    return paper_row(cwd_paper_recipe(student=f"pspnet_{STUDENTS[student]}"), method)
