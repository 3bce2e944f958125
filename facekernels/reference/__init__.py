"""Pure-PyTorch reference implementations of every facekernels loss: the parity oracles."""

from .adaptive_heads import (
    adaface_loss,
    adaface_margins,
    curricularface_loss,
    elasticface_loss,
    elasticface_margins,
    magface_loss,
    subcenter_arcface_loss,
    subcenter_dominant,
)
from .center_loss import center_loss, center_loss_update
from .contrastive import double_margin_contrastive_loss, pairwise_contrastive_loss
from .deepid2 import joint_identification_verification_loss
from .margin_softmax import (
    arcface_loss,
    cosface_loss,
    margin_logits,
    margin_softmax_loss,
    sphereface_lambda,
    sphereface_logits,
    sphereface_loss,
    sphereface_psi,
)
from .partial_fc import global_view, partial_fc_v2_loss
from .ring_loss import ring_loss
from .softmax import l2_softmax_loss, softmax_cross_entropy
from .triplet import mine_triplets, pairwise_distance, triplet_margin_loss

__all__ = [
    "adaface_loss",
    "adaface_margins",
    "arcface_loss",
    "center_loss",
    "center_loss_update",
    "cosface_loss",
    "curricularface_loss",
    "double_margin_contrastive_loss",
    "elasticface_loss",
    "elasticface_margins",
    "global_view",
    "joint_identification_verification_loss",
    "l2_softmax_loss",
    "magface_loss",
    "margin_logits",
    "margin_softmax_loss",
    "mine_triplets",
    "pairwise_contrastive_loss",
    "pairwise_distance",
    "partial_fc_v2_loss",
    "ring_loss",
    "softmax_cross_entropy",
    "sphereface_lambda",
    "sphereface_logits",
    "sphereface_loss",
    "sphereface_psi",
    "subcenter_arcface_loss",
    "subcenter_dominant",
    "triplet_margin_loss",
]
