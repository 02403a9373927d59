"""Building blocks of the experiment configs: the benchmark recipes (methods.md §6) and the
distillation terms of every method with its published weights (§1–5, §9.5).

Config files in ``configs/`` combine these, so a paper row is a few lines and every row of a
table shares one recipe.
"""

from __future__ import annotations

import ml_collections

from kdjax.defaults import base_config, local_run

ConfigDict = ml_collections.ConfigDict


def term(loss: str, *, student: str = "logits", teacher: str = "logits", weight: float = 1.0,
         connector: str | None = None, **options) -> ConfigDict:
    """One distillation term (see kdjax/distill.py)."""
    return ConfigDict(dict(loss=loss, student=student, teacher=teacher, weight=weight,
                           schedule="constant", weight_start=0.0, schedule_steps=None,
                           connector=connector, mask_ignore=False,
                           options=ConfigDict(options)))


def _kd(weight: float = 1.0) -> dict:
    return {"kd": term("pixel_kd", weight=weight, temperature=1.0)}


def _gan(weight: float = 0.001, d_weight: float = 0.1) -> dict:
    return {"adv": term("skd_adversarial", weight=weight, d_weight=d_weight)}


def method_terms(method: str, *, aux_logits: bool = True) -> ConfigDict:
    """The terms of ``method`` under the CIRKD benchmark (methods.md §5 weights; §9 for NFD, PFS,
    FAKD). Feature terms read the head feature (CIRKD's ``outputs[-1]``).

    Methods: student_alone, kd, cwd, cwd_logits (the official CWD-only recipe), nfd, pfs_wpi,
    fakd_kd, fakd_cwd, skd, ifvd, cirkd, dist, at, fitnet. ``aux_logits``: whether the student
    has an aux head (DIST then also distils the aux logits, weight 0.4).
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
    else:
        raise ValueError(f"unknown method {method!r}; see recipes.method_terms.")
    return ConfigDict(terms)


def cirkd_recipe(dataset: str, *, student: str, teacher: str = "deeplabv3_resnet101",
                 teacher_checkpoint: str | None = None) -> ConfigDict:
    """The CIRKD benchmark recipe (methods.md §6.1) on ``dataset``: batch 16, 40k steps, SGD lr
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


def cwd_paper_recipe(teacher_checkpoint: str | None = None) -> ConfigDict:
    """The CWD paper's protocol (methods.md §6.2): PSPNet-R101 → PSPNet-R18 on Cityscapes, 512×512
    crops, batch 8, 40k steps, SGD lr 0.01, wd 5e-4, the last checkpoint reported."""
    config = cirkd_recipe("cityscapes", student="pspnet_resnet18", teacher="pspnet_resnet101",
                          teacher_checkpoint=teacher_checkpoint)
    config.data.crop_size = (512, 512)
    config.data.normalization = "imagenet"
    config.train.batch_size = 8
    config.train.learning_rate = 0.01
    config.train.weight_decay = 5e-4
    config.eval.checkpoint = "last"
    config.train.eval_every = 4000
    return config


def paper_row(config: ConfigDict, method: str, arg: str | None) -> ConfigDict:
    """Finishes a single-method config: its terms, the student-alone + method comparison, and the
    ``:local`` small-run switch (a random teacher stands in for the real one)."""
    has_aux = config.student.aux if config.student.aux is not None else (
        "mobilenet" not in config.student.name)
    terms = method_terms(method, aux_logits=has_aux)
    if arg == "local":
        local_run(config)
        config.teacher.checkpoint = "random"
        adversarial = [t for t in terms.values() if t.loss == "skd_adversarial"]
        if adversarial:
            # The discriminator needs ≥ 64×64 logits, i.e. 512×512 crops at stride 8.
            config.data.crop_size = (512, 512)
            config.data.synthetic.height, config.data.synthetic.width = 512, 512
            for t in adversarial:
                t.options.conv_dim = 8
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; the only one is 'local'.")
    config.distill.terms = terms
    config.methods = ConfigDict({"student_alone": ConfigDict(), method: terms})
    return config
