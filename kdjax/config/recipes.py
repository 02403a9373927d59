"""Building blocks of the experiment configs: the benchmark recipes (docs/methods.md §6), the
distillation terms of every method (``term``, ``method_terms`` and ``METHODS``, from
:mod:`kdjax.config.methods`), and the handling of a config file's argument
(``configs/FILE.py:student=r18,method=cwd,local``).

Config files in ``configs/`` combine these, so one file per dataset and architecture family covers
every row of its table with one recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import ml_collections

from kdjax.config import methods
from kdjax.config.defaults import base_config, local_run
from kdjax.config.methods import STUDENT_MODULES, method_terms, term

ConfigDict = ml_collections.ConfigDict

# The method names, in registration order: a live view, so a method registered later is accepted
# wherever a config takes ``method=``.
METHODS = methods.METHODS.keys()
# A family file's ``student=`` values → the backbone of the student network.
STUDENTS = {"r18": "resnet18", "mbv2": "mobilenetv2"}


def cirkd_recipe(dataset: str, *, student: str, teacher: str = "deeplabv3_resnet101",
                 teacher_checkpoint: str | None = None) -> ConfigDict:
    """The CIRKD benchmark recipe (docs/methods.md §6.1) on ``dataset``: batch 16, 40k steps, SGD lr
    0.02, wd 1e-4, poly 0.9, BGR-mean normalisation, scale 0.5–2.0, flip, best checkpoint by
    whole-image single-scale val mIoU evaluated every 800 steps."""
    config = base_config()
    config.data.name = dataset
    config.data.normalization = "cirkd_bgr"
    config.data.crop_size = {"cityscapes": (512, 1024), "camvid": (360, 360)}.get(dataset,
                                                                                  (512, 512))
    config.student.name = student
    config.teacher.name = teacher
    config.teacher.checkpoint = teacher_checkpoint
    config.train.steps = 40000
    config.train.batch_size = 16
    config.train.learning_rate = 0.02
    config.train.weight_decay = 1e-4
    config.train.eval_every = 800
    config.train.checkpoint_every = 800
    config.eval.batch_size = 8 if dataset == "cityscapes" else 16
    config.eval.checkpoint = "best"
    return config


def cwd_paper_recipe(teacher_checkpoint: str | None = None, *,
                     student: str = "pspnet_resnet18") -> ConfigDict:
    """The CWD paper's protocol (docs/methods.md §6.2): PSPNet-R101 → PSPNet-R18 on Cityscapes,
    512×512 crops, batch 8, 40k steps, SGD lr 0.01, wd 5e-4, the last checkpoint reported."""
    config = cirkd_recipe("cityscapes", student=student, teacher="pspnet_resnet101",
                          teacher_checkpoint=teacher_checkpoint)
    config.data.crop_size = (512, 512)
    config.data.normalization = "imagenet"
    config.train.batch_size = 8
    config.train.learning_rate = 0.01
    config.train.weight_decay = 5e-4
    config.eval.checkpoint = "last"
    config.train.eval_every = 4000
    return config


def paper_row(config: ConfigDict, method: str) -> ConfigDict:
    """Finishes a single-method config: its terms for ``kdjax train`` and the student-alone +
    method comparison for ``kdjax compare`` (the same terms object, so an override of one changes
    both)."""
    has_aux = config.student.aux if config.student.aux is not None else (
        "mobilenet" not in config.student.name)
    terms = method_terms(method, aux_logits=has_aux, dataset=config.data.name)
    config.distill.terms = terms
    config.methods = ConfigDict({"student_alone": ConfigDict(), method: terms})
    return config


class Row(NamedTuple):
    """A published result that a family file reproduces, selected by ``configs/FILE.py:ARG``.

    ``expected`` is the distilled student's published val mIoU (None where none is published under
    the file's protocol), ``alone`` the student's without distillation, ``teacher`` the teacher's;
    ``source`` says where the expected number comes from.
    """
    student: str
    method: str
    expected: float | None
    alone: float
    teacher: float
    source: str

    @property
    def arg(self) -> str:
        return f"student={self.student},method={self.method}"


def parse_arg(arg: str | None, **choices: Iterable[str]) -> tuple[dict[str, str], bool]:
    """Splits a config argument ``key=value,...`` into the chosen values and the ``local`` flag.

    ``local`` may stand anywhere among the pairs; every key of ``choices`` must be given once, with
    one of its accepted values. Anything else is a ValueError that lists what is accepted, so a typo
    stops before any work starts.
    """
    accepted = {key: tuple(values) for key, values in choices.items()}
    pairs = ",".join(f"{key}={'|'.join(values)}" for key, values in accepted.items())
    usage = f"{pairs}, optionally with ',local'" if pairs else "only 'local'"
    values, local = {}, False
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if item == "local":
            local = True
        elif key not in accepted or key in values:
            raise ValueError(f"config argument {item!r} is not accepted: this config takes "
                             f"{usage}.")
        elif value not in accepted[key]:
            raise ValueError(f"config argument {item!r} is not accepted: {key} is one of "
                             f"{', '.join(accepted[key])}.")
        else:
            values[key] = value
    missing = [f"{key}=" for key in accepted if key not in values]
    if missing:
        raise ValueError(f"the config argument lacks {', '.join(missing)}: this config takes "
                         f"{usage}.")
    return values, local


def from_arg(arg: str | None, build: Callable[..., ConfigDict], **choices: Iterable[str]
             ) -> ConfigDict:
    """What every file in ``configs/`` returns from ``get_config(arg)``: ``build(**values)`` for
    the ``key=value`` pairs of ``arg`` (see :func:`parse_arg`), shrunk by the ``local`` flag."""
    values, local = parse_arg(arg, **choices)
    config = build(**values)
    return _local(config) if local else config


def _local(config: ConfigDict) -> ConfigDict:
    """The ``local`` flag: :func:`local_run`, plus what the shrunken experiment needs besides.

    The data are synthetic, so no data files are read. A config that distils under ``kdjax train``
    (``distill.terms`` set) and names no teacher gets random teacher weights, so no converted
    teacher is needed; ``compare`` still trains the teacher of the others. A term whose loss needs
    a bigger input shrinks as its method declares (``Method.local``).
    """
    local_run(config)
    config.data.manual_dir = None
    config.data.base_size = None
    if config.distill.terms and config.teacher.checkpoint is None:
        config.teacher.checkpoint = "random"
    shrinks = methods.local_shrinks()
    for terms in (config.distill.terms, *config.methods.values()):
        for name, entry in terms.items():
            if name != STUDENT_MODULES and entry.loss in shrinks:
                shrinks[entry.loss](config, entry)
    return config
