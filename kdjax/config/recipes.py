"""Building blocks of the experiment configs: the benchmark recipes (docs/methods.md §6), the
distillation terms of every method with its published weights (§1–5, §9.5), and the handling of a
config file's argument (``configs/FILE.py:student=r18,method=cwd,local``).

Config files in ``configs/`` combine these, so one file per dataset and architecture family covers
every row of its table with one recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import ml_collections

from kdjax.config.defaults import base_config, local_run

ConfigDict = ml_collections.ConfigDict

# The reserved key of a terms group that declares student modules (kdjax.distill.terms, which the
# config layer does not import; tests/trainer/test_student_modules.py checks that they agree).
STUDENT_MODULES = "student_modules"
# The names method_terms accepts.
METHODS = ("student_alone", "kd", "cwd", "cwd_logits", "nfd", "pfs_wpi", "fakd_kd", "fakd_cwd",
           "skd", "ifvd", "cirkd", "dist", "at", "fitnet", "af_dcd", "mgd", "cirkdv2", "bpkd")
# Af-DCD's published weights per dataset (train_scripts/ of the official code, docs/methods.md
# §10): reconstruction λ_fd, contrast λ_ctr and the pixel-KD weight; CamVid's contrast crops the
# top-left 44×44 positions of the 45×45 map of a 360×360 crop instead of pooling.
AF_DCD_WEIGHTS = {"cityscapes": (2e-6, 0.005, 1.0), "camvid": (8e-6, 0.01, 1.0),
                  "voc_aug": (1e-6, 0.005, 1.0), "ade20k": (1e-6, 0.04, 0.5),
                  "coco_stuff": (5e-6, 0.005, 0.5)}
# A family file's ``student=`` values → the backbone of the student network.
STUDENTS = {"r18": "resnet18", "mbv2": "mobilenetv2"}


def term(loss: str, *, student: str = "logits", teacher: str = "logits", weight: float = 1.0,
         connector: str | None = None, **options) -> ConfigDict:
    """One distillation term (see kdjax/distill/terms.py)."""
    return ConfigDict(dict(loss=loss, student=student, teacher=teacher, weight=weight,
                           schedule="constant", weight_start=0.0, schedule_steps=None,
                           connector=connector, mask_ignore=False, resize=None,
                           options=ConfigDict(options)))


def _kd(weight: float = 1.0) -> dict:
    return {"kd": term("pixel_kd", weight=weight, temperature=1.0)}


def _gan(weight: float = 0.001, d_weight: float = 0.1) -> dict:
    return {"adv": term("skd_adversarial", weight=weight, d_weight=d_weight)}


def method_terms(method: str, *, aux_logits: bool = True, dataset: str = "cityscapes"
                 ) -> ConfigDict:
    """The terms of ``method`` under the CIRKD benchmark (docs/methods.md §5 weights; §9 for NFD,
    PFS, FAKD; §10–12 for Af-DCD, MGD, CIRKDv2 and BPKD). Feature terms read the head feature
    (CIRKD's ``outputs[-1]``), except Af-DCD's and MGD's, which read the backbone's c4.

    Methods: :data:`METHODS`; ``cwd_logits`` is the official CWD-only recipe. ``aux_logits``:
    whether the student has an aux head (DIST then also distils the aux logits, weight 0.4).
    ``dataset`` picks Af-DCD's per-dataset weights (:data:`AF_DCD_WEIGHTS`; Cityscapes' for a
    dataset it has none for).
    """
    head = dict(student="head", teacher="head")
    terms: dict[str, ConfigDict] = {}
    if method == "student_alone":
        pass
    elif method == "kd":
        terms.update(_kd())
    elif method == "cwd":
        terms.update(_kd(), **_gan(),
                     cwd_feature=term("channel_wise_divergence", weight=50.0, tau=4.0,
                                      c_norm="student", connector="conv", **head),
                     cwd_logits=term("channel_wise_divergence", weight=3.0, tau=4.0))
    elif method == "cwd_logits":
        terms["cwd_logits"] = term("channel_wise_divergence", weight=3.0, tau=4.0)
    elif method == "nfd":
        terms["nfd"] = term("normalized_feature_distillation", weight=1.0, connector="conv",
                            **head)
    elif method == "pfs_wpi":
        terms["pfs"] = term("pixel_feature_similarity", weight=1.0, **head)
        terms["wpi"] = term("weighted_pixel_imitation", weight=1.0, temperature=1.0)
    elif method == "fakd_kd":
        terms["fakd_kd"] = term("fakd_kd", weight=1.0, temperature=1.0, lam0=7.5)
    elif method == "fakd_cwd":
        terms["fakd_cwd"] = term("fakd_cwd", weight=3.0, tau=4.0, lam0=7.5)
    elif method == "skd":
        terms.update(_kd(), **_gan(), skd=term("skd_pairwise", weight=10.0, pool=2, **head))
    elif method == "ifvd":
        terms.update(_kd(), **_gan(), ifvd=term("ifvd", weight=20.0, **head))
    elif method == "cirkd":
        terms.update(_kd())
        terms["cirkd_minibatch"] = term("cirkd_minibatch", weight=1.0, tau=0.1, group_size=2,
                                        connector="cirkd_projection", **head)
        terms["cirkd_memory"] = term("cirkd_memory", weight=0.1, region_weight=1.0, tau=0.1,
                                     connector="cirkd_projection", **head)
    elif method == "dist":
        # The original computes the intra-class part per GPU, on 2 images.
        terms["dist"] = term("dist", weight=1.0, beta=1.0, gamma=1.0, tau=1.0, group_size=2)
        if aux_logits:
            terms["dist_aux"] = term("dist", weight=0.4, beta=1.0, gamma=1.0, tau=1.0,
                                     group_size=2, student="aux_logits", teacher="aux_logits")
    elif method == "at":
        terms.update(_kd(), at=term("attention_transfer", weight=10000.0, **head))
    elif method == "fitnet":
        terms.update(_kd(), fitnet=term("fitnet", weight=10.0, connector="conv", **head))
    elif method == "af_dcd":
        reconstruction, contrast, kd = AF_DCD_WEIGHTS.get(dataset, AF_DCD_WEIGHTS["cityscapes"])
        crop = dict(crop=(44, 44), pool=0) if dataset == "camvid" else {}
        terms.update(_kd(kd))
        terms["af_dcd"] = term("dense_contrast", weight=1.0, student="c4", teacher="c4",
                               reconstruction_weight=reconstruction, contrast_weight=contrast,
                               **crop)
    elif method == "mgd":
        # The official segmentation configs (docs/methods.md §10.5): the masked reconstruction
        # (α = 2e-5, mask ratio 0.75) on the backbone's last stage, and with `use_logit=True` CWD
        # on the logits, τ = 4, weight 3.
        terms["mgd"] = term("masked_reconstruction", weight=2e-5, student="c4", teacher="c4")
        terms["cwd_logits"] = term("channel_wise_divergence", weight=3.0, tau=4.0)
    elif method == "cirkdv2":
        # CIRKD's terms (§5.4) plus FitNet and the channel terms of CIRKDv2's scripts (§11):
        # mini-batch channel 1, memory channel 0.1, channel MSE 100, in one term that shares
        # the channel projection. With FitNet on (every published script), the student's head
        # feature passes through the GCN block, trained with the student, before every feature
        # term: they read its output 'head_gcn' (a student module, kdjax/distill/terms.py).
        gcn = dict(student="head_gcn", teacher="head")
        terms.update(_kd())
        terms["fitnet"] = term("fitnet", weight=1.0, connector="conv", **gcn)
        terms["cirkd_minibatch"] = term("cirkd_minibatch", weight=1.0, tau=0.1, group_size=2,
                                        **gcn)
        terms["cirkd_memory"] = term("cirkd_memory", weight=0.1, region_weight=1.0, tau=0.1,
                                     connector="cirkd_projection", **gcn)
        terms["cirkd_channel"] = term("cirkd_channel", weight=1.0, tau=0.1, group_size=2,
                                      **gcn)
        terms[STUDENT_MODULES] = ConfigDict(
            {"head_gcn": ConfigDict(dict(module="gcn", input="head"))})
    elif method == "bpkd":
        terms["bpkd"] = term("bpkd", weight=1.0)
    else:
        raise ValueError(f"unknown method {method!r}; the methods are {', '.join(METHODS)}.")
    return ConfigDict(terms)


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
    teacher is needed; ``compare`` still trains the teacher of the others. The SKD discriminator
    needs ≥ 64×64 logits, i.e. 512×512 crops at stride 8, and is narrowed to keep the run small.
    """
    local_run(config)
    config.data.manual_dir = None
    config.data.base_size = None
    if config.distill.terms and config.teacher.checkpoint is None:
        config.teacher.checkpoint = "random"
    entries = [t for terms in (config.distill.terms, *config.methods.values())
               for name, t in terms.items() if name != STUDENT_MODULES]
    adversarial = [t for t in entries if t.loss == "skd_adversarial"]
    # Af-DCD's contrast pools the c4 map by 4 into 4×4 patches: a 64×64 crop's 8×8 map is cut
    # into patches unpooled instead.
    for t in entries:
        if t.loss == "dense_contrast":
            t.options.update(dict(pool=0, crop=None))
    if adversarial:
        config.data.crop_size = (512, 512)
        config.data.synthetic.height, config.data.synthetic.width = 512, 512
        for t in adversarial:
            t.options.conv_dim = 8
    return config
