"""Pure distillation losses for semantic segmentation (methods.md §9.1 conventions).

Every function takes NHWC arrays, treats the teacher side as a constant, computes in float32 and
returns float32 scalars. None of them holds parameters or state: trainable pieces live in
``kdjax.models`` and stateful methods pass their state in and out explicitly.
"""

from kdjax.losses._common import nearest_resize_labels
from kdjax.losses.adversarial import skd_adversarial_losses
from kdjax.losses.attention import attention_transfer
from kdjax.losses.boundary import BpkdParts, boundary_regions, bpkd, bpkd_parts
from kdjax.losses.channel_wise import channel_wise_divergence
from kdjax.losses.cirkd_channel import (CirkdChannelMemory, cirkd_channel_memory,
                                        cirkd_channel_minibatch, cirkd_channel_mse,
                                        cirkd_channel_pool, init_cirkd_channel_memory,
                                        update_cirkd_channel_memory)
from kdjax.losses.cirkd_memory import (CirkdMemory, cirkd_memory, init_cirkd_memory,
                                       update_cirkd_memory)
from kdjax.losses.dense_contrast import (centre_third_keep_mask, feature_reconstruction,
                                         omni_contrast, random_keep_mask)
from kdjax.losses.dist import dist
from kdjax.losses.fakd import (ClassCovariance, fakd_cwd, fakd_kd, fakd_strength,
                               init_class_covariance, update_class_covariance)
from kdjax.losses.fitnet import fitnet
from kdjax.losses.ifvd import ifvd
from kdjax.losses.normalized_feature import normalized_feature_distillation
from kdjax.losses.pixel_kd import pixel_kd
from kdjax.losses.relational import cirkd_minibatch, pixel_feature_similarity, skd_pairwise
from kdjax.losses.task import cross_entropy
from kdjax.losses.weighted_imitation import weighted_pixel_imitation

__all__ = [
    "BpkdParts",
    "CirkdChannelMemory",
    "CirkdMemory",
    "ClassCovariance",
    "attention_transfer",
    "boundary_regions",
    "bpkd",
    "bpkd_parts",
    "centre_third_keep_mask",
    "channel_wise_divergence",
    "cirkd_channel_memory",
    "cirkd_channel_minibatch",
    "cirkd_channel_mse",
    "cirkd_channel_pool",
    "cirkd_memory",
    "cirkd_minibatch",
    "cross_entropy",
    "dist",
    "fakd_cwd",
    "fakd_kd",
    "fakd_strength",
    "feature_reconstruction",
    "fitnet",
    "ifvd",
    "init_cirkd_channel_memory",
    "init_cirkd_memory",
    "init_class_covariance",
    "nearest_resize_labels",
    "normalized_feature_distillation",
    "omni_contrast",
    "pixel_feature_similarity",
    "pixel_kd",
    "random_keep_mask",
    "skd_adversarial_losses",
    "skd_pairwise",
    "update_cirkd_channel_memory",
    "update_cirkd_memory",
    "update_class_covariance",
    "weighted_pixel_imitation",
]
