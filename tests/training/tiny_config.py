"""A distillation run small enough for tests: quarter/eighth-width ResNet-18 DeepLabV3 teacher and
student on 32×32 synthetic crops, CWD on logits plus an NFD feature term with a connector."""

from kdjax.config.defaults import base_config
from kdjax.config.recipes import term


def get_config(arg=None):
    config = base_config()
    config.seed = 0
    config.data.name = "synthetic"
    config.data.synthetic.num_train = 16
    config.data.synthetic.num_val = 4
    config.data.synthetic.height = 32
    config.data.synthetic.width = 48
    config.data.crop_size = (32, 32)
    config.data.shuffle_buffer = 16
    config.teacher.name = "deeplabv3_resnet18"
    config.teacher.width_multiplier = 0.25
    config.teacher.head_width = 16
    config.teacher.checkpoint = "random"
    config.student.name = "deeplabv3_resnet18"
    config.student.width_multiplier = 0.125
    config.student.head_width = 8
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.learning_rate = 0.001
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.train.async_checkpoints = False
    config.eval.batch_size = 8
    config.distill.terms.cwd = term("channel_wise_divergence", weight=3.0, tau=4.0)
    config.distill.terms.nfd = term("normalized_feature_distillation", student="head",
                                    teacher="head", connector="conv")
    return config
