"""The trainer tests' tiny experiment as a comparison: a teacher trained for 2 steps, the student
alone and with the tiny config's terms, 2 steps each."""

import ml_collections

from tests.training.tiny_config import get_config as tiny_config


def get_config(arg=None):
    config = tiny_config(arg)
    config.teacher.checkpoint = None
    config.teacher_steps = 2
    config.train.steps = 2
    config.eval.overlays = 1
    config.methods = ml_collections.ConfigDict({"student_alone": ml_collections.ConfigDict(),
                                                "distilled": config.distill.terms})
    return config
