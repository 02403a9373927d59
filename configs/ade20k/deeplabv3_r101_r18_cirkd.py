"""ADE20K: CIRKD, DeepLabV3-ResNet101 → DeepLabV3-ResNet18.

CIRKD benchmark protocol on ADEChallengeData2016 (methods.md §6.1, §7.3): 20,210 train / 2,000 val,
150 classes (label 0 ignored), 512×512 crops, batch 16, 40k steps, SGD 0.02. Expected: 35.41 val
mIoU; student alone 33.91, teacher 42.70.

    kdjax compare --config=configs/ade20k/deeplabv3_r101_r18_cirkd.py --workdir=runs/ade_cirkd \
        --config.teacher.checkpoint=TEACHER_DIR \
        --config.student.backbone_checkpoint=IMAGENET_PTH --config.data.manual_dir=ADE_DIR

ADE20K images differ in size: evaluation pads each batch to `data.eval_pad_size`. Smoke test:
append `:local` to the config path.
IMAGENET_PTH: the student backbone's ImageNet weights (CIRKD's deep-stem `resnet18-imagenet.pth`
or `mobilenetv2-imagenet.pth`), which the published numbers start from.
"""

from kdjax.recipes import cirkd_recipe, paper_row


def get_config(arg=None):
    return paper_row(cirkd_recipe("ade20k", student="deeplabv3_resnet18"), "cirkd", arg)
