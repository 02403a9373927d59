"""Cityscapes, CIRKD's SegFormer protocol: SegFormer MiT-B4 → SegFormer MiT-B0.

CIRKD's SegFormer scripts (docs/methods.md §7.1): 1024×1024 crops, batch 8, 160k steps, AdamW
(lr 2e-4, weight decay 1e-4, betas 0.9/0.999, one parameter group) with the poly 0.9 schedule and no
warm-up, best checkpoint by whole-image single-scale val mIoU. The argument picks the student
(`b0`) and the method (any of `kdjax.config.recipes.METHODS`); ROWS below lists the published rows
with their expected val mIoU. A row runs as

    kdjax compare --config=configs/cityscapes_segformer.py:student=b0,method=METHOD \\
        --workdir=runs/cityscapes_segformer_METHOD \\
        --config.teacher.checkpoint=TEACHER_DIR \\
        --config.student.backbone_checkpoint=MIT_B0_PTH

for example `--config=configs/cityscapes_segformer.py:student=b0,method=cirkd` (expected 76.92;
student alone 75.58, teacher 81.23).

TEACHER_DIR: `kdjax convert --model=segformer_mit_b4 --torch=segformer_MiT_B4_citys_best_model.pth
--out=TEACHER_DIR`. MIT_B0_PTH: the ImageNet MiT-B0 encoder (`mit_b0.pth`), which the published
numbers start from. SegFormers have no aux head, so DIST distils the logits alone. Smoke test: add
`,local` to the argument.
"""

from kdjax.config.recipes import METHODS, Row, cirkd_recipe, from_arg, paper_row

CIRKD = "CIRKD README, SegFormer B4→B0 column, docs/methods.md §7.1"
UNPUBLISHED = "none published in this protocol"
TEACHER, ALONE = 81.23, 75.58
STUDENTS = {"b0": "segformer_mit_b0"}
PUBLISHED = (("cwd", 74.80, CIRKD), ("skd", 76.43, CIRKD), ("ifvd", 76.30, CIRKD),
             ("cirkd", 76.92, CIRKD), ("kd", None, UNPUBLISHED))
ROWS = tuple(Row("b0", method, expected, ALONE, TEACHER, source)
             for method, expected, source in PUBLISHED)


def get_config(arg=None):
    return from_arg(arg, _experiment, student=STUDENTS, method=METHODS)


def _experiment(student, method):
    config = cirkd_recipe("cityscapes", student=STUDENTS[student], teacher="segformer_mit_b4")
    config.student.aux = False
    config.teacher.aux = False
    config.data.crop_size = (1024, 1024)
    config.train.batch_size = 8
    config.train.steps = 160000
    config.train.optimizer = "adamw"
    config.train.learning_rate = 2e-4
    config.train.weight_decay = 1e-4
    config.train.eval_every = 8000
    config.train.checkpoint_every = 8000
    return paper_row(config, method)
