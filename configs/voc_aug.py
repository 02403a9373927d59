"""Pascal VOC 2012 aug, CIRKD benchmark protocol: DeepLabV3-ResNet101 → DeepLabV3-ResNet18 or
-MobileNetV2.

docs/methods.md §6.1 and §7.3: 10,582 train / 1,449 val, 512×512 crops, batch 16, 40k steps, SGD
0.02; CIRKD's memory loss has weight 0.01, as in CIRKD's VOC scripts. The argument picks the student
(`r18`, `mbv2`) and the method (any of `kdjax.config.recipes.METHODS`); ROWS below lists the
published row. A row runs as

    kdjax compare --config=configs/voc_aug.py:student=STUDENT,method=METHOD \\
        --workdir=runs/voc_aug_STUDENT_METHOD \\
        --config.teacher.checkpoint=TEACHER_DIR \\
        --config.student.backbone_checkpoint=IMAGENET_PTH --config.data.manual_dir=VOC_AND_SBD_DIR

for example `--config=configs/voc_aug.py:student=r18,method=cirkd` (expected 74.50; student alone
73.21, teacher 77.67).

IMAGENET_PTH: the student backbone's ImageNet weights (CIRKD's deep-stem `resnet18-imagenet.pth` or
`mobilenetv2-imagenet.pth`), which the published numbers start from. Smoke test: add `,local` to the
argument.
"""

from kdjax.config.recipes import METHODS, STUDENTS, Row, cirkd_recipe, from_arg, paper_row

ROWS = (Row("r18", "cirkd", 74.50, alone=73.21, teacher=77.67,
            source="CIRKD README, docs/methods.md §7.3"),)


def get_config(arg=None):
    return from_arg(arg, _experiment, student=STUDENTS, method=METHODS)


def _experiment(student, method):
    config = paper_row(cirkd_recipe("voc_aug", student=f"deeplabv3_{STUDENTS[student]}"), method)
    if "cirkd_memory" in config.distill.terms:
        config.distill.terms.cirkd_memory.weight = 0.01
    return config
