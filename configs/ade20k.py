"""ADE20K, CIRKD benchmark protocol: DeepLabV3-ResNet101 → DeepLabV3-ResNet18 or -MobileNetV2.

ADEChallengeData2016 under docs/methods.md §6.1 and §7.3: 20,210 train / 2,000 val, 150 classes
(label 0 ignored), 512×512 crops, batch 16, 40k steps, SGD 0.02. The argument picks the student
(`r18`, `mbv2`) and the method (any of `kdjax.config.recipes.METHODS`); ROWS below lists the
published row. A row runs as

    kdjax compare --config=configs/ade20k.py:student=STUDENT,method=METHOD \\
        --workdir=runs/ade20k_STUDENT_METHOD \\
        --config.teacher.checkpoint=TEACHER_DIR \\
        --config.student.backbone_checkpoint=IMAGENET_PTH --config.data.manual_dir=ADE_DIR

for example `--config=configs/ade20k.py:student=r18,method=cirkd` (expected 35.41; student alone
33.91, teacher 42.70).

ADE20K images differ in size: evaluation pads each batch to `data.eval_pad_size`. IMAGENET_PTH: the
student backbone's ImageNet weights (CIRKD's deep-stem `resnet18-imagenet.pth` or
`mobilenetv2-imagenet.pth`), which the published numbers start from. Smoke test: add `,local` to the
argument.
"""

from kdjax.config.recipes import METHODS, STUDENTS, Row, cirkd_recipe, from_arg, paper_row

ROWS = (Row("r18", "cirkd", 35.41, alone=33.91, teacher=42.70,
            source="CIRKD README, docs/methods.md §7.3"),)


def get_config(arg=None):
    return from_arg(arg, _experiment, student=STUDENTS, method=METHODS)


def _experiment(student, method):
    return paper_row(cirkd_recipe("ade20k", student=f"deeplabv3_{STUDENTS[student]}"), method)
