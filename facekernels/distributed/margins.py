"""How PartialFC reads its margin_loss, at every forward as insightface does (a margin
warm-up that changes s or m2 between steps takes effect): facekernels' heads and
insightface's CombinedMarginLoss / ArcFace / CosFace become the fused op's options; any
other callable is run as insightface runs it, on dense logits."""

import math
from dataclasses import dataclass
from typing import Optional

from facekernels.losses.adaptive_heads import _AdaptiveHead
from facekernels.losses.margin_heads import JointIdentificationVerificationLoss, _MarginSoftmaxHead
from facekernels.ops.checks import check_number
from facekernels.ops.margin_softmax import COMBINED, EASY, SPHERE

# insightface's recognition/arcface_torch/losses.py, recognized by class and module name
# (train_v2.py imports it as `losses`), without importing insightface.
_INSIGHTFACE = ("CombinedMarginLoss", "ArcFace", "CosFace")


@dataclass
class Margins:
    """The fused op's margin options for one forward."""

    kind: int
    scale: float
    m1: float
    m2: float
    m3: float
    gradient: str
    interclass_filtering_threshold: float = 0.0
    head: Optional[_AdaptiveHead] = None  # batch-dependent options come from it
    sub_centers: int = 1


def is_insightface(margin_loss):
    cls = type(margin_loss)
    return cls.__name__ in _INSIGHTFACE and cls.__module__.rsplit(".", 1)[-1] == "losses"


def fused(margin_loss):
    """True for a margin_loss that PartialFC runs on the fused op; False for a callable
    that it runs densely. Raises for a head that a class shard cannot represent."""
    owner = "PartialFC"
    if isinstance(margin_loss, _MarginSoftmaxHead):
        name = type(margin_loss).__name__
        if (margin_loss.kind == SPHERE or not margin_loss.normalize_embeddings
                or not margin_loss.normalize_weight
                or isinstance(margin_loss, JointIdentificationVerificationLoss)):
            raise ValueError(f"{owner}: margin_loss {name} cannot be class-sharded (PartialFC "
                             "takes the cosine heads: ArcFace, CosFace, CombinedMarginLoss, "
                             "CurricularFace, AdaFace, MagFace, SubCenterArcFace, ElasticFace)")
        return True
    if is_insightface(margin_loss):
        return True
    if type(margin_loss).__module__.split(".")[0] == "facekernels":
        raise ValueError(f"{owner}: margin_loss {type(margin_loss).__name__} is not a margin head")
    if not callable(margin_loss):
        raise TypeError(f"{owner}: margin_loss must be a margin head or a callable "
                        f"margin_loss(logits, labels), got {type(margin_loss).__name__}")
    return False


def read(margin_loss, gradient):
    """The Margins of a fused margin_loss as it is now. gradient: PartialFC's override for
    the combined margins (None: the object's own)."""
    owner, name = "PartialFC", type(margin_loss).__name__

    def number(attribute, value, low=-math.inf):
        return check_number(owner, f"margin_loss.{attribute}", value, low)

    if isinstance(margin_loss, _MarginSoftmaxHead):
        m1, m2, m3, _ = margin_loss.margins()
        adaptive = isinstance(margin_loss, _AdaptiveHead)
        if gradient is not None and adaptive and gradient != "exact":
            raise ValueError(f"{owner}: gradient={gradient!r} applies to the combined margins; "
                             f"{name} has exact gradients")
        return Margins(margin_loss.kind, margin_loss.scale, m1, m2, m3,
                       gradient or margin_loss.gradient,
                       head=margin_loss if adaptive else None,
                       sub_centers=margin_loss.sub_centers)
    # insightface's: ArcFace (s, cos_m, sin_m, easy_margin; an exact gradient, the monotone
    # fallback past pi), CosFace (s, m), CombinedMarginLoss (the angle shifted without a
    # gradient when m1 == 1 and m3 == 0, else CosFace with m3 > 0; m2 is then unused).
    if name == "ArcFace":
        margin = math.atan2(number("sin_m", margin_loss.sin_m), number("cos_m", margin_loss.cos_m))
        kind = EASY if getattr(margin_loss, "easy_margin", False) else COMBINED
        return Margins(kind, number("scale", margin_loss.scale, 0.0), 1.0, margin, 0.0,
                       gradient or "exact")
    if name == "CosFace":
        return Margins(COMBINED, number("s", margin_loss.s, 0.0), 1.0, 0.0, number("m", margin_loss.m),
                       gradient or "exact")
    s = number("s", margin_loss.s, 0.0)
    m1, m2, m3 = (number(a, getattr(margin_loss, a)) for a in ("m1", "m2", "m3"))
    threshold = number("interclass_filtering_threshold",
                       getattr(margin_loss, "interclass_filtering_threshold", 0.0))
    if m1 == 1.0 and m3 == 0.0:
        return Margins(COMBINED, s, 1.0, m2, 0.0, gradient or "detached", threshold)
    if m3 > 0:
        return Margins(COMBINED, s, 1.0, 0.0, m3, gradient or "detached", threshold)
    raise ValueError(f"{owner}: insightface's CombinedMarginLoss takes m1 == 1 and m3 == 0 "
                     f"(ArcFace) or m3 > 0 (CosFace), got m1={m1}, m3={m3}")


__all__ = ["Margins", "fused", "is_insightface", "read"]
