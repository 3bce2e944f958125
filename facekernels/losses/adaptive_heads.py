"""Heads that adapt the margin per sample or reshape the negatives, on the same fused op
as ArcFace: CurricularFace, AdaFace, MagFace, sub-center ArcFace and ElasticFace. Each
computes its per-row inputs (O(N) numbers) here and lets the op do the N x C part."""

import math

import torch
import torch.nn.functional as F

from facekernels.losses.margin_heads import ArcFaceLoss, _MarginSoftmaxHead
from facekernels.ops.adaface_margins import adaface_margins
from facekernels.ops.checks import (
    check_choice,
    check_label_range,
    check_labels,
    check_number,
    check_positive_int,
)
from facekernels.ops.margin_softmax import (
    ADAFACE,
    COMBINED,
    EASY,
    accumulate_dtype,
    check_tensors,
)
from facekernels.ops.running import assign_after


def _accumulate(t):
    return t.to(accumulate_dtype(t.dtype))


def _norms(embeddings):
    """Row norms in the accumulate type, summed in fp64 so that a finite fp32 row never
    overflows to inf (that happens from 1.8e19 on)."""
    return torch.linalg.vector_norm(embeddings, dim=1, dtype=torch.float64).to(
        accumulate_dtype(embeddings.dtype))


def _unit_rows(t):
    """Rows scaled to unit norm in the accumulate type, as F.normalize (norm floored at
    1e-12) but with _norms' fp64 sum, so that a finite fp32 row is never zeroed."""
    return _accumulate(t) / _norms(t).clamp_min(1e-12)[:, None]


@torch.no_grad()
def target_cosines(embeddings, weight, labels):
    """cos(x_i, w_{y_i}) [N] in fp32 (fp64 for fp64), clamped to [-1, 1], no gradient.
    Labels out of range are clamped here: the op that follows rejects them by name."""
    rows = labels.clamp(0, weight.shape[0] - 1)
    return (_unit_rows(embeddings) * _unit_rows(weight.index_select(0, rows))).sum(1).clamp(-1.0, 1.0)


def _finite_mean_std(values):
    """Mean and unbiased std of the finite entries: a NaN row (whose own loss is NaN) must
    not make every other row's margin NaN. NaN where undefined: the mean of no entry, the
    std of fewer than two (not 0 / -1 = -0, which would pass for a finite std)."""
    finite = values.isfinite()
    count = finite.sum()
    mean = torch.where(finite, values, 0).sum() / count
    squares = torch.where(finite, values - mean, 0).square().sum()
    std = torch.where(count > 1, squares / (count - 1), math.nan).sqrt()
    return mean, std


def _running(old, batch_value, rate):
    """The EMA step rate * batch_value + (1 - rate) * old, or old where that is not finite
    (no finite row in the batch): a buffer once NaN would poison every later batch."""
    new = rate * batch_value.to(old.dtype) + (1 - rate) * old
    return torch.where(new.isfinite(), new, old)


class _AdaptiveHead(_MarginSoftmaxHead):
    """A margin head whose op inputs depend on the batch (exact gradients, as the official
    heads). batch_options returns them with the running statistics' new values, which are
    written only once the op has accepted the batch: bad input leaves the buffers as they
    were. distributed.PartialFC calls batch_options too, with the whole global batch, its
    own copy of the running buffers and a target_cosines that reads across the shards."""

    running = ()  # the names of the running buffers
    random_margins = False  # batch_options draws from a generator

    def __init__(self, num_classes, embedding_size, scale, reduction, chunk_size, sub_centers=1):
        super().__init__(num_classes, embedding_size, scale, "exact", reduction, chunk_size,
                         sub_centers)

    def batch_options(self, embeddings, target_cosines, running, training):
        """-> (the op's per-batch options, {running buffer's name: new value}).
        target_cosines(): cos(x_i, w_{y_i}) [N], no gradient; running: {name: tensor}."""
        return {}, {}

    def loss(self, embeddings, labels, weight, return_predictions=False):
        check_tensors(embeddings, weight, labels, type(self).__name__)
        if self.random_margins and self.training and not torch.compiler.is_compiling():
            # Before the draw: a rejected call must leave the generator where it was. (A
            # compiled graph draws its seeds from the global generator when it starts.)
            check_label_range(type(self).__name__, labels, weight.shape[0] // self.sub_centers)
        running = {name: getattr(self, name) for name in self.running}
        options, updates = self.batch_options(
            embeddings, lambda: target_cosines(embeddings, weight, labels), running, self.training)
        result = self.fused_loss(embeddings, labels, weight, return_predictions, **options)
        loss = result[0] if return_predictions else result
        if updates:
            assign_after([running[name] for name in updates],
                         [value.detach() for value in updates.values()], loss.detach())
        return result


class CurricularFaceLoss(_AdaptiveHead):
    """CurricularFace (Huang et al. 2020): ArcFace's target s cos(theta_y + m) (continued as
    cos theta_y - m sin m past pi), and every non-target cosine c above the row's
    cos(theta_y + m) (a hard negative) becomes c (t + c), so hard negatives weigh more as
    training advances. t is a running buffer: in training mode, before each forward uses it,
    t <- 0.01 mean_i cos(theta_{y_i}) + 0.99 t (no gradient; saved in the state dict; the
    mean over finite rows, so a NaN embedding makes only its own loss NaN). In eval mode t
    is used as is (the official head updates it on every call)."""

    running = ("t",)

    def __init__(self, num_classes, embedding_size, margin=0.5, scale=64.0, reduction="mean",
                 chunk_size=None):
        margin = check_number("CurricularFaceLoss", "margin", margin)
        super().__init__(num_classes, embedding_size, scale, reduction, chunk_size)
        self.margin = margin
        self.register_buffer("t", torch.zeros(1))

    def margins(self):
        return 1.0, self.margin, 0.0, 0.0

    def batch_options(self, embeddings, target_cosines, running, training):
        cosines = target_cosines()
        t = _running(running["t"], _finite_mean_std(cosines)[0], 0.01) if training else running["t"]
        # The official mask compares with cos(theta + m) itself, not the fallback target.
        sines = (1.0 - cosines * cosines).sqrt()
        threshold = cosines * math.cos(self.margin) - sines * math.sin(self.margin)
        options = {"hard_threshold": threshold, "hard_t": t.expand(len(cosines))}
        return options, {"t": t} if training else {}


class AdaFaceLoss(_AdaptiveHead):
    """AdaFace (Kim et al. 2022): the margin adapts to image quality, read from the feature
    norm. forward takes RAW (unnormalized) embeddings. With n_i = clip(|x_i|, 0.001, 100)
    (detached), z_i = clip(h (n_i - mean) / (std + eps), -1, 1), eps = 1e-3:

        target s (cos(clip(theta_i - m z_i, eps, pi - eps)) - (m + m z_i)),
        non-targets s c, every cosine clamped to [-1 + eps, 1 - eps].

    mean and std are running buffers (initial 20 and 100, as the official head), updated
    in training mode before use: mean <- t_alpha mean_i n_i + (1 - t_alpha) mean, std
    likewise with the batch's unbiased std (so training batches need two rows or more; both
    over the finite rows, so a NaN embedding makes only its own loss NaN).
    t_alpha = 0.01 is the official training default (the official class defaults to 1)."""

    kind = ADAFACE
    running = ("batch_mean", "batch_std")

    def __init__(self, num_classes, embedding_size, margin=0.4, h=0.333, scale=64.0,
                 t_alpha=0.01, reduction="mean", chunk_size=None):
        owner = "AdaFaceLoss"
        margin = check_number(owner, "margin", margin)
        h = check_number(owner, "h", h, 0.0)
        t_alpha = check_number(owner, "t_alpha", t_alpha, 0.0, 1.0)
        super().__init__(num_classes, embedding_size, scale, reduction, chunk_size)
        self.margin, self.h, self.t_alpha = margin, h, t_alpha
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def margins(self):
        return 1.0, 0.0, self.margin, 0.0  # shown by repr; the op takes per-row margins

    def batch_options(self, embeddings, target_cosines, running, training):
        m2, m3, mean, std = adaface_margins(embeddings, running["batch_mean"], running["batch_std"],
                                            self.h, self.margin, self.t_alpha, training,
                                            owner="AdaFaceLoss")
        return {"row_m2": m2, "row_m3": m3}, {"batch_mean": mean, "batch_std": std} if training else {}


class MagFaceLoss(_AdaptiveHead):
    """MagFace (Meng et al. 2021): the margin grows with the feature norm, and a regularizer
    rewards large norms for confident samples. forward takes RAW embeddings. With
    a_i = clamp(|x_i|, l_a, u_a) and m_i = l_m + (u_m - l_m) (a_i - l_a) / (u_a - l_a):

        loss_i = CE(target s cos(theta_i + m_i)) + lambda_g g(a_i),  g(a) = a / u_a^2 + 1 / a,

    the gradient flowing into |x_i| through both m_i and g. easy_margin=True (the official
    default) keeps s cos theta where cos theta <= 0; False continues as ArcFace past pi."""

    def __init__(self, num_classes, embedding_size, scale=64.0, l_a=10.0, u_a=110.0, l_m=0.45,
                 u_m=0.8, lambda_g=35.0, easy_margin=True, reduction="mean", chunk_size=None):
        owner = "MagFaceLoss"
        l_a = check_number(owner, "l_a", l_a, 0.0)
        if l_a == 0.0:
            raise ValueError(f"{owner}: l_a must be positive (g(a) = a / u_a^2 + 1 / a), got 0")
        u_a = check_number(owner, "u_a", u_a, l_a)
        if u_a == l_a:
            raise ValueError(f"{owner}: u_a must exceed l_a = {l_a}, got {u_a}")
        l_m = check_number(owner, "l_m", l_m)
        u_m = check_number(owner, "u_m", u_m)
        lambda_g = check_number(owner, "lambda_g", lambda_g, 0.0)
        super().__init__(num_classes, embedding_size, scale, reduction, chunk_size)
        self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = l_a, u_a, l_m, u_m, lambda_g
        self.easy_margin = bool(easy_margin)
        self.kind = EASY if self.easy_margin else COMBINED

    def margins(self):
        return 1.0, self.l_m, 0.0, 0.0  # shown by repr; the op takes per-row margins

    def batch_options(self, embeddings, target_cosines, running, training):
        a = _norms(embeddings).clamp(self.l_a, self.u_a)
        m = self.l_m + (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a)
        g = a / self.u_a**2 + 1.0 / a
        return {"row_m2": m, "penalty": self.lambda_g * g}, {}


class SubCenterArcFaceLoss(_AdaptiveHead):
    """Sub-center ArcFace (Deng et al. 2020): K sub-centers per class, weight [C * K, D]
    class-major (row c K + j is sub-center j of class c); a class's cosine is the max over
    its sub-centers, then ArcFace (s cos(theta + m), continued past pi). Noisy samples
    gather on non-dominant sub-centers; once the model is discriminative, drop_sub_centers
    keeps the dominant one per class and names the outlier samples."""

    def __init__(self, num_classes, embedding_size, k=3, margin=0.5, scale=64.0,
                 reduction="mean", chunk_size=None):
        k = check_positive_int("SubCenterArcFaceLoss", "k", k)
        margin = check_number("SubCenterArcFaceLoss", "margin", margin)
        super().__init__(num_classes, embedding_size, scale, reduction, chunk_size, k)
        self.margin = margin

    def margins(self):
        return 1.0, self.margin, 0.0, 0.0

    @torch.no_grad()
    def drop_sub_centers(self, embeddings, labels, threshold=75.0, rows_per_step=65536):
        """The paper's step against label noise: each sample (of the training set, embedded
        by the current model) votes for the nearest sub-center of its class; a class keeps
        its most voted one (ties: the lowest index; no samples: sub-center 0). Returns
        (ArcFaceLoss with those rows as its weight and this head's margin, scale, reduction
        and chunk size; int64 indices of the samples more than `threshold` degrees from
        their class's dominant sub-center, ascending), to retrain on the clean samples. A
        sample whose embedding is not finite has no angle: it does not vote and counts as an
        outlier. Reads `rows_per_step` samples at a time and keeps each one's K cosines;
        never N x C."""
        owner = "SubCenterArcFaceLoss.drop_sub_centers"
        self.check_embeddings(owner, embeddings)
        check_labels(owner, labels, embeddings)
        check_label_range(owner, labels, self.num_classes)
        threshold = check_number(owner, "threshold", threshold, 0.0, 180.0)
        check_positive_int(owner, "rows_per_step", rows_per_step)
        c, k, d = self.num_classes, self.sub_centers, self.embedding_size
        centers = F.normalize(_accumulate(self.weight), dim=1).view(c, k, d)

        def own_cosines(start):  # [rows, K]: each sample's cosines to its class's sub-centers
            x = F.normalize(_accumulate(embeddings[start:start + rows_per_step]), dim=1)
            return torch.einsum("nkd,nd->nk", centers[labels[start:start + rows_per_step]], x)

        cosines = torch.cat([own_cosines(s) for s in range(0, len(labels), rows_per_step)])
        finite = cosines.isfinite().all(1)
        votes = torch.bincount((labels * k + cosines.argmax(1))[finite], minlength=c * k).view(c, k)
        dominant = votes.argmax(1)
        near = cosines.gather(1, dominant[labels, None]).squeeze(1) >= math.cos(math.radians(threshold))
        far = ~(near & finite)
        head = ArcFaceLoss(c, d, margin=self.margin, scale=self.scale, reduction=self.reduction,
                           chunk_size=self.chunk_size).to(self.weight.device, self.weight.dtype)
        head.weight.copy_(self.weight.view(c, k, d)[torch.arange(c, device=dominant.device), dominant])
        return head, far.nonzero().flatten()


class ElasticFaceLoss(_AdaptiveHead):
    """ElasticFace (Boutros et al. 2022): each training row draws its margin m_i from
    N(margin, std); kind "arc": target s cos(theta + m_i) (continued past pi as ArcFace;
    the official head has no continuation), "cos": s (cos theta - m_i). plus=True
    (ElasticFace+) hands the sorted margins out by the rows' target cosines exactly as the
    official code (row i gets the sorted margins' entry at the i-th largest cosine's
    row index). margin defaults to the official 0.5 for "arc", 0.35 for "cos". Eval mode
    uses `margin` for every row. generator: a torch.Generator for the draws (on any device;
    the margins move to the embeddings' device); torch.compile cannot trace one, so a
    compiled module should leave it None (the global RNG)."""

    random_margins = True

    def __init__(self, num_classes, embedding_size, margin=None, std=0.0125, scale=64.0,
                 kind="arc", plus=False, generator=None, reduction="mean", chunk_size=None):
        owner = "ElasticFaceLoss"
        check_choice(owner, "kind", kind, ("arc", "cos"))
        margin = check_number(owner, "margin", {"arc": 0.5, "cos": 0.35}[kind] if margin is None else margin)
        std = check_number(owner, "std", std, 0.0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {generator!r}")
        super().__init__(num_classes, embedding_size, scale, reduction, chunk_size)
        self.margin, self.std, self.elastic_kind, self.plus = margin, std, kind, bool(plus)
        self.generator = generator

    def margins(self):
        return (1.0, self.margin, 0.0, 0.0) if self.elastic_kind == "arc" else (1.0, 0.0, self.margin, 0.0)

    def batch_options(self, embeddings, target_cosines, running, training):
        n = len(embeddings)
        dtype = accumulate_dtype(embeddings.dtype)
        if training:
            device = self.generator.device if self.generator is not None else embeddings.device
            drawn = torch.empty(n, dtype=dtype, device=device).normal_(
                self.margin, self.std, generator=self.generator).to(embeddings.device)
            if self.plus:
                order = target_cosines().argsort(descending=True, stable=True)
                drawn = drawn.sort(stable=True).values[order]
        else:
            drawn = torch.full((n,), self.margin, dtype=dtype, device=embeddings.device)
        return {"row_m2" if self.elastic_kind == "arc" else "row_m3": drawn}, {}


__all__ = ["AdaFaceLoss", "CurricularFaceLoss", "ElasticFaceLoss", "MagFaceLoss",
           "SubCenterArcFaceLoss"]
