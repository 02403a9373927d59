"""Pascal VOC 2012 aug: CIRKD, DeepLabV3-ResNet101 → DeepLabV3-ResNet18.

CIRKD benchmark protocol on VOC aug (methods.md §6.1, §7.3): 10,582 train / 1,449 val, 512×512
crops, batch 16, 40k steps, SGD 0.02, memory-loss weights 0.01 as in CIRKD's VOC scripts. Expected:
74.50 val mIoU; student alone 73.21, teacher 77.67.

    kdjax compare --config=configs/voc_aug/deeplabv3_r101_r18_cirkd.py --workdir=runs/voc_cirkd \
        --config.teacher.checkpoint=TEACHER_DIR \
        --config.student.backbone_checkpoint=IMAGENET_PTH --config.data.manual_dir=VOC_AND_SBD_DIR

Smoke test: append `:local` to the config path.
IMAGENET_PTH: the student backbone's ImageNet weights (CIRKD's deep-stem `resnet18-imagenet.pth`
or `mobilenetv2-imagenet.pth`), which the published numbers start from.
"""

from kdjax.recipes import cirkd_recipe, paper_row


def get_config(arg=None):
    config = paper_row(cirkd_recipe("voc_aug", student="deeplabv3_resnet18"), "cirkd", arg)
    config.distill.terms.cirkd_memory.weight = 0.01
    return config
