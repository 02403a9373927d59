"""The distillation methods: one registry, each method's terms with their published weights in one
entry (docs/methods.md §1–5 for the papers' weights, §9.5 for the pairings, §10–12 for Af-DCD, MGD,
CIRKDv2 and BPKD).

A method is data: its name, a function that writes its terms for a dataset (a loss kind of
:data:`kdjax.distill.ADAPTERS` per term, the tensors it reads, its weight and options), where the
weights come from, and how its terms shrink under a config's ``local`` flag. Everything that lists
methods (:func:`method_terms`, the ``method=`` argument of the family configs, the ``local`` flag,
the tests) reads :data:`METHODS`. A method of your own is one :func:`register_method` call
(``docs/architecture.md``, "Adding your own method")::

    register_method(Method(
        name="my_kd", source="my paper, Table 2",
        build=lambda dataset, aux_logits: {"kd": term("my_loss", weight=2.0, tau=3.0)}))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import ml_collections

ConfigDict = ml_collections.ConfigDict

# The reserved key of a terms group that declares student modules (kdjax/distill/terms.py).
STUDENT_MODULES = "student_modules"


def term(loss: str, *, student: str = "logits", teacher: str = "logits", weight: float = 1.0,
         connector: str | None = None, **options) -> ConfigDict:
    """One distillation term (the fields: kdjax/distill/terms.py)."""
    return ConfigDict(dict(loss=loss, student=student, teacher=teacher, weight=weight,
                           schedule="constant", weight_start=0.0, schedule_steps=None,
                           connector=connector, mask_ignore=False, resize=None,
                           options=ConfigDict(options)))


# How a term of one loss kind shrinks under ``local``: ``shrink(config, term)`` edits both in place.
Shrink = Callable[[ConfigDict, ConfigDict], None]


@dataclasses.dataclass(frozen=True)
class Method:
    """One distillation method.

    Attributes:
      name: what configs call it (``method_terms(name)``, ``method=name``).
      build: ``build(dataset, aux_logits) -> {term name: term(...)}``: the method's terms for the
        dataset (whose published weights it picks), for a student with or without an aux head. A
        terms group may also hold ``STUDENT_MODULES``.
      source: where the terms and weights come from (a paper, its code, a docs/methods.md §).
      local: loss kind → how a term of that kind shrinks under ``local`` (a CPU smoke test on
        64×64 synthetic crops), for a loss whose defaults need a bigger input.
    """

    name: str
    build: Callable[[str, bool], Mapping[str, ConfigDict]]
    source: str
    local: Mapping[str, Shrink] = dataclasses.field(default_factory=dict)

    def terms(self, *, dataset: str = "cityscapes", aux_logits: bool = True) -> ConfigDict:
        return ConfigDict(dict(self.build(dataset, aux_logits)))


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Adds ``method`` to :data:`METHODS`. A name may be registered once, and a loss kind shrinks
    one way under ``local`` whichever method uses it."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already.")
    shrinks = local_shrinks()
    for loss, shrink in method.local.items():
        if shrinks.get(loss, shrink) is not shrink:
            raise ValueError(f"method {method.name!r} shrinks {loss!r} terms under 'local' "
                             f"differently from a registered method; reuse its function.")
    METHODS[method.name] = method
    return method


def method_terms(method: str, *, aux_logits: bool = True, dataset: str = "cityscapes"
                 ) -> ConfigDict:
    """The terms of ``method`` (a key of :data:`METHODS`) under the CIRKD benchmark, for
    ``dataset`` and a student with (``aux_logits``) or without an aux head."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; the methods are {', '.join(METHODS)}.")
    return METHODS[method].terms(dataset=dataset, aux_logits=aux_logits)


def local_shrinks() -> dict[str, Shrink]:
    """Loss kind → its shrink under ``local``, over every registered method."""
    return {loss: shrink for method in METHODS.values() for loss, shrink in method.local.items()}


# ---------------------------------------------------------------------------------------------
# The shrinks.

def _small_discriminator(config: ConfigDict, adversarial: ConfigDict) -> None:
    # The SKD discriminator needs ≥ 64×64 logits, i.e. 512×512 crops at stride 8; it is narrowed
    # to keep the run small.
    config.data.crop_size = (512, 512)
    config.data.synthetic.height, config.data.synthetic.width = 512, 512
    adversarial.options.conv_dim = 8


def _unpooled_contrast(config: ConfigDict, contrast: ConfigDict) -> None:
    # Af-DCD's contrast pools the c4 map by 4 into 4×4 patches: a 64×64 crop's 8×8 map is cut
    # into patches unpooled instead.
    del config
    contrast.options.update(dict(pool=0, crop=None))


# ---------------------------------------------------------------------------------------------
# The methods. Feature terms read the head feature (CIRKD's ``outputs[-1]``), except Af-DCD's and
# MGD's, which read the backbone's c4.

HEAD = dict(student="head", teacher="head")


def _kd(weight: float = 1.0) -> dict:
    return {"kd": term("pixel_kd", weight=weight, temperature=1.0)}


def _gan() -> dict:
    return {"adv": term("skd_adversarial", weight=0.001, d_weight=0.1)}


ADVERSARIAL = {"skd_adversarial": _small_discriminator}


def _cirkd_memory(**features) -> ConfigDict:
    return term("cirkd_memory", weight=0.1, region_weight=1.0, tau=0.1,
                connector="cirkd_projection", **features)


def _cirkd() -> dict:
    return {**_kd(), "cirkd_memory": _cirkd_memory(**HEAD),
            "cirkd_minibatch": term("cirkd_minibatch", weight=1.0, tau=0.1, group_size=2,
                                    connector="cirkd_projection", **HEAD)}


def _dist(dataset: str, aux_logits: bool) -> dict:
    del dataset
    # The original computes the intra-class part per GPU, on 2 images.
    options = dict(beta=1.0, gamma=1.0, tau=1.0, group_size=2)
    terms = {"dist": term("dist", weight=1.0, **options)}
    if aux_logits:
        terms["dist_aux"] = term("dist", weight=0.4, student="aux_logits",
                                 teacher="aux_logits", **options)
    return terms


# Af-DCD's published weights per dataset (train_scripts/ of the official code, docs/methods.md
# §10): reconstruction λ_fd, contrast λ_ctr and the pixel-KD weight; CamVid's contrast crops the
# top-left 44×44 positions of the 45×45 map of a 360×360 crop instead of pooling.
AF_DCD_WEIGHTS = {"cityscapes": (2e-6, 0.005, 1.0), "camvid": (8e-6, 0.01, 1.0),
                  "voc_aug": (1e-6, 0.005, 1.0), "ade20k": (1e-6, 0.04, 0.5),
                  "coco_stuff": (5e-6, 0.005, 0.5)}


def _af_dcd(dataset: str, aux_logits: bool) -> dict:
    del aux_logits
    reconstruction, contrast, kd = AF_DCD_WEIGHTS.get(dataset, AF_DCD_WEIGHTS["cityscapes"])
    crop = dict(crop=(44, 44), pool=0) if dataset == "camvid" else {}
    return {**_kd(kd), "af_dcd": term("dense_contrast", weight=1.0, student="c4", teacher="c4",
                                      reconstruction_weight=reconstruction,
                                      contrast_weight=contrast, **crop)}


def _cirkdv2(dataset: str, aux_logits: bool) -> dict:
    del dataset, aux_logits
    # With FitNet on (every published script), the student's head feature passes through the GCN
    # block, trained with the student, before every feature term: they read its output
    # 'head_gcn'. The channel terms share one projection, so they are one term.
    gcn = dict(student="head_gcn", teacher="head")
    return {**_kd(), "fitnet": term("fitnet", weight=1.0, connector="conv", **gcn),
            "cirkd_minibatch": term("cirkd_minibatch", weight=1.0, tau=0.1, group_size=2,
                                    **gcn),
            "cirkd_memory": _cirkd_memory(**gcn),
            "cirkd_channel": term("cirkd_channel", weight=1.0, tau=0.1, group_size=2, **gcn),
            STUDENT_MODULES: ConfigDict({"head_gcn": ConfigDict(dict(module="gcn",
                                                                     input="head"))})}


def _fixed(terms: Callable[[], dict]) -> Callable[[str, bool], dict]:
    """The build of a method whose terms depend on neither the dataset nor the aux head."""
    return lambda dataset, aux_logits: terms()


def _cwd_logits() -> dict:
    return {"cwd_logits": term("channel_wise_divergence", weight=3.0, tau=4.0)}


for _method in (
    Method("student_alone", _fixed(dict), "the student without a teacher"),
    Method("kd", _fixed(_kd), "Hinton et al. 2015 as CIRKD's baseline, §5"),
    Method("cwd", _fixed(lambda: {
        **_kd(), **_gan(),
        "cwd_feature": term("channel_wise_divergence", weight=50.0, tau=4.0, c_norm="student",
                            connector="conv", **HEAD),
        **_cwd_logits()}), "CIRKD's CWD row, §1.3, §5", local=ADVERSARIAL),
    Method("cwd_logits", _fixed(_cwd_logits), "the official CWD-only recipe, §1"),
    Method("nfd", _fixed(lambda: {"nfd": term("normalized_feature_distillation", weight=1.0,
                                              connector="conv", **HEAD)}),
           "NFD, §2, §9.2"),
    Method("pfs_wpi", _fixed(lambda: {
        "pfs": term("pixel_feature_similarity", weight=1.0, **HEAD),
        "wpi": term("weighted_pixel_imitation", weight=1.0, temperature=1.0)}),
        "PFS + WPI, §3, §9.3"),
    Method("fakd_kd", _fixed(lambda: {"fakd_kd": term("fakd_kd", weight=1.0, temperature=1.0,
                                                      lam0=7.5)}), "FAKD with KD, §4, §9.4"),
    Method("fakd_cwd", _fixed(lambda: {"fakd_cwd": term("fakd_cwd", weight=3.0, tau=4.0,
                                                        lam0=7.5)}), "FAKD with CWD, §4, §9.4"),
    Method("skd", _fixed(lambda: {**_kd(), **_gan(),
                                  "skd": term("skd_pairwise", weight=10.0, pool=2, **HEAD)}),
           "SKD as CIRKD's baseline, §5", local=ADVERSARIAL),
    Method("ifvd", _fixed(lambda: {**_kd(), **_gan(), "ifvd": term("ifvd", weight=20.0, **HEAD)}),
           "IFVD as CIRKD's baseline, §5", local=ADVERSARIAL),
    Method("cirkd", _fixed(_cirkd), "CIRKD, §5.4"),
    Method("dist", _dist, "DIST, §5"),
    Method("at", _fixed(lambda: {**_kd(), "at": term("attention_transfer", weight=10000.0,
                                                     **HEAD)}), "AT as CIRKD's baseline, §5"),
    Method("fitnet", _fixed(lambda: {**_kd(), "fitnet": term("fitnet", weight=10.0,
                                                             connector="conv", **HEAD)}),
           "FitNet as CIRKD's baseline, §5"),
    Method("af_dcd", _af_dcd, "Af-DCD's train_scripts/, §10",
           local={"dense_contrast": _unpooled_contrast}),
    # The official segmentation configs (§10.5): the masked reconstruction (α = 2e-5, mask ratio
    # 0.75) on the backbone's last stage, and with `use_logit=True` CWD on the logits, τ = 4,
    # weight 3.
    Method("mgd", _fixed(lambda: {
        "mgd": term("masked_reconstruction", weight=2e-5, student="c4", teacher="c4"),
        **_cwd_logits()}), "MGD's segmentation configs, §10.5"),
    # CIRKD's terms (§5.4) plus FitNet and the channel terms of CIRKDv2's scripts (§11):
    # mini-batch channel 1, memory channel 0.1, channel MSE 100.
    Method("cirkdv2", _cirkdv2, "CIRKDv2's scripts, §11"),
    Method("bpkd", _fixed(lambda: {"bpkd": term("bpkd", weight=1.0)}), "BPKD, §12"),
):
    register_method(_method)
