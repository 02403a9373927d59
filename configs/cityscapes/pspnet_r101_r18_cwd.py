"""Cityscapes, CWD paper protocol: CWD on logits (weight 3, τ 4), PSPNet-ResNet101 → PSPNet-ResNet18.

Protocol of methods.md §6.2: 512×512 crops, batch 8, 40k steps, SGD 0.01, weight decay 5e-4, the
last checkpoint evaluated whole-image single-scale. Expected: 74.87 val mIoU (CWD paper Table 2,
mean of 3 runs); student alone 69.10, teacher 78.56.

    kdjax compare --config=configs/cityscapes/pspnet_r101_r18_cwd.py --workdir=runs/psp_cwd \
        --config.teacher.checkpoint=TEACHER_DIR \
        --config.student.backbone_checkpoint=IMAGENET_PTH

TEACHER_DIR: a PSPNet-ResNet101 model dir from `kdjax convert --model=pspnet_resnet101
--num-classes=19 --torch=teacher.pth --out=TEACHER_DIR`. Smoke test: append `:local` to the path.
IMAGENET_PTH: the student backbone's ImageNet weights (CIRKD's deep-stem `resnet18-imagenet.pth`
or `mobilenetv2-imagenet.pth`), which the published numbers start from.
"""

from kdjax.recipes import cwd_paper_recipe, paper_row


def get_config(arg=None):
    return paper_row(cwd_paper_recipe(), "cwd_logits", arg)
