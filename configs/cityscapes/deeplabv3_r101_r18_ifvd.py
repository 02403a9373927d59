"""Cityscapes: IFVD (KD + GAN + IFV), DeepLabV3-ResNet101 → DeepLabV3-ResNet18.

CIRKD benchmark protocol (methods.md §6.1): 512×1024 crops, batch 16, 40k steps, SGD 0.02, best
checkpoint by whole-image single-scale val mIoU. Expected: 75.59 val mIoU; student alone 74.21,
teacher 78.07.

    kdjax compare --config=configs/cityscapes/deeplabv3_r101_r18_ifvd.py --workdir=runs/deeplabv3_r101_r18_ifvd \
        --config.teacher.checkpoint=TEACHER_DIR \
        --config.student.backbone_checkpoint=IMAGENET_PTH

TEACHER_DIR is a DeepLabV3-ResNet101 model dir (`kdjax convert --model=deeplabv3_resnet101
--num-classes=19 --torch=teacher.pth --out=TEACHER_DIR`). Smoke test: `--config=configs/cityscapes/deeplabv3_r101_r18_ifvd.py:local`.
IMAGENET_PTH: the student backbone's ImageNet weights (CIRKD's deep-stem `resnet18-imagenet.pth`
or `mobilenetv2-imagenet.pth`), which the published numbers start from.
"""

from kdjax.recipes import cirkd_recipe, paper_row


def get_config(arg=None):
    config = cirkd_recipe("cityscapes", student="deeplabv3_resnet18")
    return paper_row(config, "ifvd", arg)
