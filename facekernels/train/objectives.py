"""The trainer's losses, each runnable two ways on the same parameters: through facekernels'
fused modules or through the pure-PyTorch reference functions."""

import copy

import torch
from torch import nn

import facekernels
from facekernels import reference
from facekernels.distributed import PartialFC
from facekernels.losses import ring_loss

# The heads after ArcFace: per-sample margins or reshaped negatives, some with running state.
ADAPTIVE = ("curricularface", "adaface", "magface", "subcenter", "elasticface")
LOSSES = ("softmax", "l2softmax", "ring", "center", "sphereface", "cosface", "arcface",
          "combined", "contrastive", "triplet", "deepid2") + ADAPTIVE
MINING = ("all", "semihard", "hard", "batch_hard", "facenet")
IMPLS = ("reference", "facekernels")

# The class-sharded head under --distributed: ArcFace and CosFace with insightface's
# semantics (s, m1, m2, m3; the reference is its PartialFC_V2), and the heads that
# PartialFC shards as they are (the reference: the head's on the whole job, global_view).
DISTRIBUTED_MARGINS = {"arcface": (16.0, 1.0, 0.5, 0.0), "cosface": (16.0, 1.0, 0.0, 0.35)}
DISTRIBUTED = (*DISTRIBUTED_MARGINS, "combined", *ADAPTIVE)
CENTER_WEIGHT = 0.003  # lambda of softmax + lambda * center loss (Wen et al. use 0.003-0.01)
MARGIN_SCALE = 16.0  # s for the margin losses: 64 is tuned for millions of faces, not 30 people

# Training defaults per loss (epochs, learning rate, photos per person in a batch), tuned on
# AT&T: metric losses want more photos of each person per batch and learn more slowly.
# The additive-margin heads: 100 epochs beat 60 on every fold of a 3-fold split of the
# training people of the first --folds 4 fold (ArcFace), whose held-out people it never saw.
TRAINING_DEFAULTS = {"epochs": 60, "lr": 2e-3, "per_person": 4}
TRAINING_DEFAULTS_BY_LOSS = {
    "arcface": {"epochs": 100},
    "cosface": {"epochs": 100},
    "combined": {"epochs": 100},
    **{head: {"epochs": 100} for head in ADAPTIVE},  # ArcFace's family: its schedule
    "center": {"epochs": 120},
    "triplet": {"epochs": 80, "lr": 5e-3, "per_person": 8},
    "contrastive": {"epochs": 80, "lr": 5e-3, "per_person": 8},
}


def training_defaults(loss):
    return {**TRAINING_DEFAULTS, **TRAINING_DEFAULTS_BY_LOSS.get(loss, {})}


class Objective(nn.Module):
    """One loss of the LOSSES list over `num_classes` training identities.

    forward(embeddings, labels, impl) -> (loss, predicted classes or None)
    reference_loss(embeddings, labels, tensors): the reference formula on the given
        stand-ins for the parameters (see tensors()), free of side effects, for parity.
    """

    def __init__(self, loss, num_classes, embedding_size, mining="all", distributed=False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {loss!r}")
        if mining not in MINING:
            raise ValueError(f"--mining must be one of {MINING}, got {mining!r}")
        self.loss, self.mining, self.distributed = loss, mining, distributed
        c, d = num_classes, embedding_size
        if distributed and loss not in DISTRIBUTED:
            raise ValueError(f"--distributed trains {DISTRIBUTED}, got --loss {loss}")
        heads = {
            "softmax": lambda: facekernels.SoftmaxLoss(c, d),
            "l2softmax": lambda: facekernels.L2SoftmaxLoss(c, d, alpha=16.0),
            "ring": lambda: facekernels.SoftmaxLoss(c, d),
            "center": lambda: facekernels.SoftmaxLoss(c, d),
            "sphereface": lambda: facekernels.SphereFaceLoss(c, d, margin=2, lambda_base=100.0,
                                                             lambda_min=5.0),
            "cosface": lambda: facekernels.CosFaceLoss(c, d, margin=0.35, scale=MARGIN_SCALE),
            "arcface": lambda: facekernels.ArcFaceLoss(c, d, margin=0.5, scale=MARGIN_SCALE),
            "combined": lambda: facekernels.CombinedMarginLoss(c, d, m1=1.0, m2=0.2, m3=0.1,
                                                               scale=MARGIN_SCALE),
            "contrastive": lambda: facekernels.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0),
            "triplet": lambda: facekernels.TripletMarginLoss(margin=0.2, mining=mining),
            "deepid2": lambda: facekernels.JointIdentificationVerificationLoss(
                c, d, margin=1.0, verification_weight=0.05),
            "curricularface": lambda: facekernels.CurricularFaceLoss(c, d, scale=MARGIN_SCALE),
            "adaface": lambda: facekernels.AdaFaceLoss(c, d, scale=MARGIN_SCALE),
            "magface": lambda: facekernels.MagFaceLoss(c, d, scale=MARGIN_SCALE),
            "subcenter": lambda: facekernels.SubCenterArcFaceLoss(c, d, k=3, scale=MARGIN_SCALE),
            "elasticface": lambda: facekernels.ElasticFaceLoss(
                c, d, scale=MARGIN_SCALE, generator=torch.Generator().manual_seed(0)),
        }
        if distributed and loss in DISTRIBUTED_MARGINS:
            s, m1, m2, m3 = DISTRIBUTED_MARGINS[loss]
            heads[loss] = lambda: facekernels.CombinedMarginLoss(1, d, m1, m2, m3, scale=s, gradient="detached")
        self.head = PartialFC(heads[loss](), d, c) if distributed else heads[loss]()
        if loss == "ring":
            self.ring = facekernels.RingLoss(loss_weight=0.01)
        if loss == "center":
            self.center = facekernels.CenterLoss(c, d, alpha=0.5)

    @property
    def margin_head(self):
        """The head's hyperparameters: the head, or the one that PartialFC shards (whose
        running buffers, t / batch_mean / batch_std, are PartialFC's)."""
        return self.head.margin_softmax if self.distributed else self.head

    def tensors(self):
        """The loss's parameters and state that the reference formula reads."""
        found = {}
        if hasattr(self.head, "weight"):
            found["weight"] = self.head.weight
        if self.loss == "ring":
            found["radius"] = self.ring.radius
        if self.loss == "center":
            found["centers"] = self.center.centers
        return found

    def forward(self, embeddings, labels, impl):
        if impl == "facekernels":
            return self._fused(embeddings, labels)
        if impl != "reference":
            raise ValueError(f"--impl must be one of {IMPLS}, got {impl!r}")
        tensors = self.tensors()
        if self.loss in ADAPTIVE:
            loss, state = self._adaptive_reference(*self._whole_job(embeddings, labels, tensors["weight"]),
                                                   advance=self.training)
            if self.training:
                with torch.no_grad():
                    for name, value in state.items():
                        getattr(self.head, name).copy_(value.reshape(1))
        else:
            loss = self.reference_loss(embeddings, labels, tensors)
        if self.training and self.loss == "center":
            with torch.no_grad():
                self.center.centers.copy_(reference.center_loss_update(
                    self.center.centers, embeddings, labels, self.center.alpha))
        if self.training and self.loss == "sphereface":
            self.head.iteration += 1
        predicted = None
        if "weight" in tensors and not self.distributed:  # a shard cannot classify alone
            with torch.no_grad():
                predicted = self.head.get_logits(embeddings).argmax(1)
        return loss, predicted

    def _fused(self, embeddings, labels):
        if self.distributed or self.loss in ("contrastive", "triplet"):
            return self.head(embeddings, labels), None
        loss, predicted = self.head(embeddings, labels, return_predictions=True)
        if self.loss == "ring":
            loss = loss + self.ring(embeddings)
        if self.loss == "center":
            loss = loss + CENTER_WEIGHT * self.center(embeddings, labels)
        return loss, predicted

    def fused_loss(self, e, y, tensors):
        """The facekernels functional ops on the given stand-ins: side-effect free (no
        center update, no SphereFace step), for the float64 parity check."""
        if self.loss in ("contrastive", "triplet"):
            return self.head(e, y)
        if self.loss in ADAPTIVE:
            # On a copy in e's dtype: its running state and margin draws stay untouched.
            return copy.deepcopy(self.head).to(e.dtype).loss(e, y, tensors["weight"])
        loss = self.head.loss(e, y, tensors["weight"])
        if self.distributed:
            return loss
        if self.loss == "ring":
            loss = loss + ring_loss(e, tensors["radius"], self.ring.loss_weight)
        if self.loss == "center":
            loss = loss + CENTER_WEIGHT * facekernels.center_loss(e, y, tensors["centers"])
        return loss

    def reference_loss(self, e, y, tensors):
        w = tensors.get("weight")
        head = self.margin_head
        if self.distributed and self.loss in DISTRIBUTED_MARGINS:
            m1, m2, m3, _ = head.margins()
            return reference.partial_fc_v2_loss(e, y, w, self.head.class_start, s=head.scale, m1=m1,
                                                m2=m2, m3=m3)
        e, y, w = self._whole_job(e, y, w)
        if self.loss in ("softmax", "ring", "center"):
            loss = reference.softmax_cross_entropy(e, w, y)
            if self.loss == "ring":
                loss = loss + reference.ring_loss(e, tensors["radius"], self.ring.loss_weight)
            if self.loss == "center":
                loss = loss + CENTER_WEIGHT * reference.center_loss(e, y, tensors["centers"])
            return loss
        if self.loss == "l2softmax":
            return reference.l2_softmax_loss(e, w, y, alpha=head.scale)
        if self.loss == "sphereface":
            return reference.sphereface_loss(e, w, y, margin=head.margin,
                                             lambda_=head.current_lambda(), scale=head.scale)
        if self.loss in ("cosface", "arcface", "combined"):
            m1, m2, m3, _ = head.margins()
            return reference.margin_softmax_loss(e, w, y, scale=head.scale, m1=m1, m2=m2, m3=m3)
        if self.loss == "contrastive":
            return reference.double_margin_contrastive_loss(
                e, y, pos_margin=head.pos_margin, neg_margin=head.neg_margin)
        if self.loss == "triplet":
            return reference.triplet_margin_loss(e, y, margin=head.margin, mining=self.mining)
        if self.loss in ADAPTIVE:
            return self._adaptive_reference(e, y, w, advance=False)[0]
        return reference.joint_identification_verification_loss(
            e, w, y, margin=head.margin, verification_weight=head.verification_weight)

    def _whole_job(self, e, y, w):
        """Under --distributed, the whole job's batch, labels and weight on every rank (the
        head's reference on them has PartialFC's gradients); else the arguments."""
        if not self.distributed:
            return e, y, w
        return reference.global_view(e, y, w, num_classes=self.head.num_classes,
                                     sub_centers=self.head.sub_centers)

    def _adaptive_reference(self, e, y, w, advance):
        """(loss, the running state after this step) of an adaptive head's reference on
        (e, y, w) (the whole job's, see _whole_job), from the head's state before it. ElasticFace draws the margins the head would draw next,
        from its generator (advanced only with `advance`)."""
        head = self.margin_head
        if self.loss == "curricularface":
            loss, t = reference.curricularface_loss(e, w, y, self.head.t, margin=head.margin, scale=head.scale)
            return loss, {"t": t}
        if self.loss == "adaface":
            loss, mean, std = reference.adaface_loss(e, w, y, self.head.batch_mean, self.head.batch_std,
                                                     margin=head.margin, h=head.h, scale=head.scale,
                                                     t_alpha=head.t_alpha)
            return loss, {"batch_mean": mean, "batch_std": std}
        if self.loss == "magface":
            return reference.magface_loss(e, w, y, scale=head.scale, l_a=head.l_a, u_a=head.u_a,
                                          l_m=head.l_m, u_m=head.u_m, lambda_g=head.lambda_g,
                                          easy_margin=head.easy_margin), {}
        if self.loss == "subcenter":
            return reference.subcenter_arcface_loss(e, w, y, k=head.sub_centers, margin=head.margin,
                                                    scale=head.scale), {}
        generator = head.generator if advance else copy.deepcopy(head.generator)
        if self.training:
            margins = torch.empty(len(y), dtype=e.dtype).normal_(head.margin, head.std, generator=generator)
        else:
            margins = torch.full((len(y),), head.margin, dtype=e.dtype)
        return reference.elasticface_loss(e, w, y, margins.to(e.device), kind=head.elastic_kind,
                                          scale=head.scale, plus=head.plus), {}
