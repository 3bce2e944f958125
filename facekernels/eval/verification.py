"""Face verification metrics: ROC, AUC, TAR@FAR, EER, best-threshold accuracy and the LFW
10-fold protocol, plus building and scoring verification pairs.

Convention throughout: a score is a similarity (higher = more alike) and a pair is
accepted as "same person" when ``score >= threshold``. Metrics are computed on the CPU in
float64 whatever the inputs' device and dtype. Scores must be finite: a NaN score has no
rank, so it is a ValueError naming its index, never a silently rejected pair.
"""

import math

import torch
import torch.nn.functional as F

from facekernels.eval._checks import (
    as_tensor,
    check_embeddings,
    check_finite,
    check_int,
    check_integer,
    check_real,
)

# The FARs that verification_report quotes, keyed as the report writes them.
REPORT_FARS = {"1e-1": 1e-1, "1e-2": 1e-2, "1e-3": 1e-3}

# Slack for comparing fp / n_neg against a FAR written as a decimal (1e-3 * 1000 etc.).
_FAR_EPS = 1e-9


def _check_scores(op, scores, same):
    scores = as_tensor(op, "scores", scores)
    same = as_tensor(op, "same", same)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{op}: scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{op}: scores must be floating point, got {scores.dtype}")
    if same.dtype != torch.bool:
        raise ValueError(f"{op}: same must be a bool tensor, got {same.dtype}")
    if same.shape != scores.shape:
        raise ValueError(
            f"{op}: same has shape {tuple(same.shape)} but scores has shape {tuple(scores.shape)}"
        )
    scores = scores.to("cpu", torch.float64)
    check_finite(op, "scores", scores)
    return scores, same.cpu()


def _check_folds(op, folds, n):
    folds = check_int(op, "folds", folds, 2)
    if n < folds:
        raise ValueError(f"{op}: scores has {n} pairs, fewer than folds={folds}")
    return folds


def _roc_counts(scores, same):
    """(tp, fp, thresholds) at every distinct score, descending, after a leading +inf.

    Sorting once and cutting at the last index of each run of equal scores makes tied
    pairs enter the accepted set together, whatever order the sort left them in."""
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores, sorted_same = scores[order], same[order]
    tp = torch.cumsum(sorted_same, 0, dtype=torch.int64)
    fp = torch.cumsum(~sorted_same, 0, dtype=torch.int64)
    run_end = torch.ones_like(sorted_same)
    run_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    zero = torch.zeros(1, dtype=torch.int64)
    inf = torch.full((1,), math.inf, dtype=torch.float64)
    return (
        torch.cat([zero, tp[run_end]]),
        torch.cat([zero, fp[run_end]]),
        torch.cat([inf, sorted_scores[run_end]]),
    )


def _class_counts(op, same):
    n_pos = int(same.sum())
    n_neg = same.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{op}: same needs both positive and negative pairs, got {n_pos} positive and "
            f"{n_neg} negative"
        )
    return n_pos, n_neg


def _roc_curve(op, scores, same):
    scores, same = _check_scores(op, scores, same)
    n_pos, n_neg = _class_counts(op, same)
    tp, fp, thresholds = _roc_counts(scores, same)
    return fp.double() / n_neg, tp.double() / n_pos, thresholds


def roc_curve(scores, same):
    """The ROC curve of a verification score list.

    Args:
        scores: float [P], similarity of each pair (higher = more similar).
        same: bool [P], whether the pair is of the same identity (needs both classes).

    Returns:
        (fpr, tpr, thresholds), float64 [T]: ``thresholds`` are +inf (accept nothing, so
        the curve starts at (0, 0)) followed by the distinct scores in descending order;
        at each, a pair is accepted when ``score >= threshold``. Pairs with equal scores
        are always accepted together, so ties give a single (diagonal) step.
    """
    return _roc_curve("roc_curve", scores, same)


def roc_auc(fpr, tpr):
    """Area under the ROC curve by the trapezoidal rule (ties thus count one half, as in
    the Mann-Whitney statistic).

    Args:
        fpr, tpr: the [T] curves returned by ``roc_curve`` (finite, fpr non-decreasing).
    """
    op = "roc_auc"
    fpr, tpr = as_tensor(op, "fpr", fpr).double(), as_tensor(op, "tpr", tpr).double()
    if fpr.dim() != 1 or fpr.numel() < 2:
        raise ValueError(f"{op}: fpr must be a 1-D tensor of at least 2 points, got shape {tuple(fpr.shape)}")
    if tpr.shape != fpr.shape:
        raise ValueError(f"{op}: tpr has shape {tuple(tpr.shape)} but fpr has shape {tuple(fpr.shape)}")
    check_finite(op, "fpr", fpr)
    check_finite(op, "tpr", tpr)
    if (fpr.diff() < 0).any():  # the area would come out negative or too small
        raise ValueError(f"{op}: fpr must be non-decreasing, as roc_curve returns it")
    return float(torch.trapezoid(tpr, fpr))


def tar_at_far(scores, same, far):
    """True accept rate at a false accept rate: the largest TAR over the ROC thresholds
    whose FAR is at most ``far``.

    Returns None when there are fewer than ``1 / far`` negative pairs: then even a single
    false accept exceeds ``far``, so the operating point is not resolved by the data and
    the only admissible thresholds are those with zero false accepts.
    """
    op = "tar_at_far"
    far = check_real(op, "far", far)
    if not 0.0 < far <= 1.0:
        raise ValueError(f"{op}: far must be in (0, 1], got {far}")
    scores, same = _check_scores(op, scores, same)
    n_pos, n_neg = _class_counts(op, same)
    if n_neg * far < 1.0 - _FAR_EPS:
        return None
    tp, fp, _ = _roc_counts(scores, same)
    admissible = fp <= n_neg * far + _FAR_EPS
    return float(tp[admissible].max()) / n_pos


def equal_error_rate(scores, same):
    """Equal error rate: the error where FAR equals FRR (= 1 - TAR).

    FAR - FRR is non-decreasing along the ROC (from -1 at +inf to 1 at the lowest score);
    the EER is read off the first ROC point where it reaches 0, linearly interpolated from
    the point before it when the crossing falls between two ROC points.
    """
    fpr, tpr, _ = _roc_curve("equal_error_rate", scores, same)
    fnr = 1.0 - tpr
    diff = fpr - fnr
    k = int(torch.nonzero(diff >= 0)[0])  # k >= 1: diff[0] = -1
    if diff[k] == 0:
        return float(fpr[k])
    t = -diff[k - 1] / (diff[k] - diff[k - 1])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def best_threshold(scores, same):
    """The accuracy-maximizing threshold of a score list, and that accuracy.

    Candidates are the ``roc_curve`` thresholds. Among those with the highest accuracy the
    lowest is taken, and the returned threshold is then moved to the midpoint of the gap
    between it and the next lower distinct score: no pair lies in that gap, so the
    accuracy is unchanged, but a held-out pair (see ``kfold_accuracy``) is split at the
    middle of the margin rather than on its edge. When the lowest score wins it is
    returned as is; when +inf wins (reject everything) +inf is returned.

    Either class may be absent (all-positive or all-negative lists are valid).

    Returns:
        (threshold, accuracy) as Python floats.
    """
    scores, same = _check_scores("best_threshold", scores, same)
    n_neg = same.numel() - int(same.sum())
    tp, fp, thresholds = _roc_counts(scores, same)
    correct = tp + (n_neg - fp)
    # Thresholds descend, so the last index reaching the maximum is the lowest threshold.
    k = int(torch.nonzero(correct == correct.max())[-1])
    threshold = thresholds[k]
    if 0 < k < thresholds.numel() - 1:
        threshold = (thresholds[k] + thresholds[k + 1]) / 2
    return float(threshold), float(correct[k]) / same.numel()


def kfold_accuracy(scores, same, folds=10):
    """Verification accuracy by k-fold cross-validation of the threshold: the "unrestricted"
    10-fold protocol of Huang et al. 2007, "Labeled Faces in the Wild".

    The pairs are split into ``folds`` contiguous folds in the order given (LFW's pairs.txt
    is already ordered by fold; shuffle other lists first, e.g. with ``make_pairs``). The
    first ``P % folds`` folds get one extra pair. For each fold the threshold is chosen by
    ``best_threshold`` on the other folds and the accuracy measured on the held-out fold.

    Returns:
        (mean, std) of the per-fold accuracies as Python floats; std is the population
        standard deviation (divides by ``folds``), as in the common LFW evaluation code.
    """
    scores, same = _check_scores("kfold_accuracy", scores, same)
    folds = _check_folds("kfold_accuracy", folds, scores.numel())
    accuracies = []
    for held_out in torch.tensor_split(torch.arange(scores.numel()), folds):
        train = torch.ones(scores.numel(), dtype=torch.bool)
        train[held_out] = False
        threshold, _ = best_threshold(scores[train], same[train])
        accepted = scores[held_out] >= threshold
        accuracies.append((accepted == same[held_out]).double().mean())
    accuracies = torch.stack(accuracies)
    return float(accuracies.mean()), float(accuracies.std(correction=0))


def verification_report(scores, same, folds=10):
    """The standard verification summary of a score list, JSON-serializable.

    Returns:
        dict with "accuracy" and "accuracy_std" (``kfold_accuracy``, Huang et al. 2007),
        "tar_at_far" ({"1e-1": ..., "1e-2": ..., "1e-3": ...}, only the FARs the number of
        negative pairs resolves, see ``tar_at_far``), "eer" and "roc_auc"; all values are
        Python floats.
    """
    # Checked here, so that no error names a function the caller did not call.
    op = "verification_report"
    scores, same = _check_scores(op, scores, same)
    _class_counts(op, same)
    folds = _check_folds(op, folds, scores.numel())
    accuracy, accuracy_std = kfold_accuracy(scores, same, folds)
    tars = {}
    for key, far in REPORT_FARS.items():
        tar = tar_at_far(scores, same, far)
        if tar is not None:
            tars[key] = tar
    return {
        "accuracy": accuracy,
        "accuracy_std": accuracy_std,
        "tar_at_far": tars,
        "eer": equal_error_rate(scores, same),
        "roc_auc": roc_auc(*roc_curve(scores, same)[:2]),
    }


def _pair_from_linear(t):
    """Maps t in [0, n(n-1)/2) to the pair (i, j), i < j, enumerated j-major:
    t = j (j - 1) / 2 + i. The float square root is corrected by one step either way."""
    j = torch.floor((1 + torch.sqrt(1 + 8 * t.double())) / 2).long()
    j = j - (j * (j - 1) // 2 > t).long()
    j = j + ((j + 1) * j // 2 <= t).long()
    return t - j * (j - 1) // 2, j


def make_pairs(labels, *, max_negatives_per_positive=1, generator=None):
    """Verification pairs from an identity-labelled set.

    All positive pairs (i < j with equal labels) and a uniform random sample, without
    replacement, of ``max_negatives_per_positive`` times as many negative pairs (i < j,
    different labels); every negative pair when fewer exist. The pairs are returned in one
    random order, so that contiguous folds (``kfold_accuracy``) mix both classes. The
    result is a deterministic function of ``labels`` and the generator's state.

    Args:
        labels: int [N] identity labels (CPU or not; the result is on the CPU).
        max_negatives_per_positive: non-negative int.
        generator: an optional CPU ``torch.Generator``.

    Returns:
        (i, j, same): int64 [P], int64 [P], bool [P].
    """
    op = "make_pairs"
    labels = as_tensor(op, "labels", labels).cpu()
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"{op}: labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    check_integer(op, "labels", labels)
    ratio = check_int(op, "max_negatives_per_positive", max_negatives_per_positive, 0)

    # Positives: every pair within each identity's (sorted) index group.
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    groups = [g for g in torch.split(order, counts.tolist()) if g.numel() > 1]
    if not groups:
        raise ValueError(f"{op}: labels has no identity with two samples: there are no positive pairs")
    positives = torch.cat([torch.combinations(torch.sort(g).values, 2) for g in groups])

    n = labels.numel()
    n_neg_total = n * (n - 1) // 2 - positives.shape[0]
    wanted = min(ratio * positives.shape[0], n_neg_total)
    if 2 * wanted >= n_neg_total:
        # A large share of all negatives: enumerate them and choose.
        i, j = torch.triu_indices(n, n, offset=1)
        negative = labels[i] != labels[j]
        negatives = torch.stack([i[negative], j[negative]], 1)
        negatives = negatives[torch.randperm(n_neg_total, generator=generator)[:wanted]]
    else:
        # A small share: rejection-sample linear pair indices so memory stays O(wanted)
        # rather than O(N^2). Each batch is expected to more than fill what is missing.
        chosen = torch.empty(0, dtype=torch.int64)
        while chosen.numel() < wanted:
            t = torch.randint(n * (n - 1) // 2, (4 * (wanted - chosen.numel()) + 64,),
                              generator=generator)
            i, j = _pair_from_linear(t)
            chosen = torch.unique(torch.cat([chosen, t[labels[i] != labels[j]]]))
        # The distinct draws are a uniform subset of their size, so a uniform sub-subset
        # of them is a uniform sample of the negatives.
        chosen = chosen[torch.randperm(chosen.numel(), generator=generator)[:wanted]]
        negatives = torch.stack(_pair_from_linear(chosen), 1)

    pairs = torch.cat([positives, negatives])
    same = torch.cat([torch.ones(positives.shape[0], dtype=torch.bool),
                      torch.zeros(negatives.shape[0], dtype=torch.bool)])
    shuffle = torch.randperm(pairs.shape[0], generator=generator)
    return pairs[shuffle, 0], pairs[shuffle, 1], same[shuffle]


def pair_scores(embeddings, i, j):
    """Cosine similarity of embeddings rows ``i[k]`` and ``j[k]`` for every pair k.

    Args:
        embeddings: float [N, D]; L2-normalized here, so raw features are fine.
        i, j: integer [P] row indices in [0, N) (negative indices do not wrap).

    Returns:
        float [P] in the embeddings' dtype and device; NaN for a pair with a non-finite
        embedding, whose similarity is undefined (the metrics above then reject it).
    """
    op = "pair_scores"
    embeddings = check_embeddings(op, "embeddings", embeddings)
    i, j = as_tensor(op, "i", i), as_tensor(op, "j", j)
    if i.dim() != 1 or i.numel() == 0:
        raise ValueError(f"{op}: i must be a non-empty 1-D index tensor, got shape {tuple(i.shape)}")
    if j.shape != i.shape:
        raise ValueError(f"{op}: j has shape {tuple(j.shape)} but i has shape {tuple(i.shape)}")
    n = embeddings.shape[0]
    for name, index in (("i", i), ("j", j)):
        check_integer(op, name, index)
        if int(index.min()) < 0 or int(index.max()) >= n:
            raise ValueError(f"{op}: {name} must hold row indices in [0, {n}), got values "
                             f"from {int(index.min())} to {int(index.max())}")
    normalized = F.normalize(embeddings, dim=1)
    # int64, since torch would read a uint8 index as a mask.
    i, j = i.to(normalized.device, torch.int64), j.to(normalized.device, torch.int64)
    return (normalized[i] * normalized[j]).sum(dim=1)
