"""Verification metrics checked against values worked out by hand on tiny score lists.

Convention: a pair is accepted when score >= threshold; thresholds are +inf followed by the
distinct scores in descending order."""

import json
import math

import pytest
import torch

from facekernels.eval import (
    best_threshold,
    equal_error_rate,
    kfold_accuracy,
    make_pairs,
    pair_scores,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_report,
)

F64 = torch.float64
T, F = True, False


def t64(values):
    return torch.tensor(values, dtype=F64)


# The main hand example: 3 positives (0.9, 0.8, 0.6), 3 negatives (0.7, 0.5, 0.4).
SCORES = t64([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
SAME = torch.tensor([T, T, F, T, F, F])
# threshold  inf   0.9   0.8   0.7   0.6   0.5   0.4
# TP          0     1     2     2     3     3     3     -> TPR / 3
# FP          0     0     0     1     1     2     3     -> FPR / 3
# correct    0+3   1+3   2+3   2+2   3+2   3+1   3+0   (TP + rejected negatives) / 6
ROC_THRESHOLDS = [math.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
ROC_TPR = [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1]
ROC_FPR = [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1]

# Ties: scores (0.9 T, 0.7 T, 0.7 F, 0.3 F). The two 0.7 pairs move together:
# threshold  inf   0.9   0.7   0.3
# TPR         0    1/2    1     1
# FPR         0     0    1/2    1
TIE_SCORES = t64([0.9, 0.7, 0.7, 0.3])
TIE_SAME = torch.tensor([T, T, F, F])

# Ten negatives, four positives, one positive tied with a negative at 0.4.
# negatives: 0.95 0.5 0.45 0.4 0.35 0.3 0.25 0.2 0.15 0.1; positives: 0.9 0.8 0.6 0.4
TEN_SCORES = t64([0.95, 0.9, 0.8, 0.6, 0.5, 0.45, 0.4, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1])
TEN_SAME = torch.tensor([F, T, T, T, F, F, T, F, F, F, F, F, F, F])


def test_roc_curve_hand_example():
    fpr, tpr, thresholds = roc_curve(SCORES, SAME)
    assert thresholds.tolist() == ROC_THRESHOLDS
    torch.testing.assert_close(tpr, t64(ROC_TPR))
    torch.testing.assert_close(fpr, t64(ROC_FPR))


def test_roc_curve_does_not_depend_on_input_order():
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    fpr, tpr, thresholds = roc_curve(SCORES[perm], SAME[perm])
    assert thresholds.tolist() == ROC_THRESHOLDS
    torch.testing.assert_close(tpr, t64(ROC_TPR))
    torch.testing.assert_close(fpr, t64(ROC_FPR))


def test_roc_curve_ties_move_together():
    fpr, tpr, thresholds = roc_curve(TIE_SCORES, TIE_SAME)
    assert thresholds.tolist() == [math.inf, 0.9, 0.7, 0.3]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    # Same with the tied negative listed before the tied positive.
    fpr, tpr, _ = roc_curve(TIE_SCORES[[0, 2, 1, 3]], TIE_SAME[[0, 2, 1, 3]])
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]


def test_roc_auc_hand_examples():
    # Main: trapezoids 1/3 * 2/3 (FPR 0 -> 1/3 at TPR 2/3) + 1/3 * 1 + 1/3 * 1 = 8/9,
    # = P(positive score > negative score): only (0.6 pos, 0.7 neg) of 9 is misordered.
    assert roc_auc(*roc_curve(SCORES, SAME)[:2]) == pytest.approx(8 / 9)
    # Ties: (1/2 + 1)/2 * 1/2 + 1 * 1/2 = 0.875 = (3 + 1/2 for the tie) / 4 pairs.
    assert roc_auc(*roc_curve(TIE_SCORES, TIE_SAME)[:2]) == pytest.approx(0.875)


def test_equal_error_rate_exact_crossing():
    # FNR = 1 - TPR = 1, 2/3, 1/3, 1/3, 0, 0, 0; FPR = 0, 0, 0, 1/3, ...: at threshold 0.7
    # FPR = FNR = 1/3.
    assert equal_error_rate(SCORES, SAME) == pytest.approx(1 / 3)


def test_equal_error_rate_interpolated_across_a_tie():
    # FPR - FNR: -1, -1/2 (0.9: FPR 0, FNR 1/2), +1/2 (0.7: FPR 1/2, FNR 0), 1. Crossing
    # halfway between 0.9 and 0.7: FPR = 0 + 1/2 * 1/2 = 1/4, FNR = 1/2 - 1/2 * 1/2 = 1/4.
    assert equal_error_rate(TIE_SCORES, TIE_SAME) == pytest.approx(0.25)


def test_equal_error_rate_interpolated_on_a_flat_fpr():
    # Scores 0.9 T, 0.8 F, 0.7 T, 0.6 F, 0.5 F (2 positives, 3 negatives).
    # threshold  inf   0.9   0.8   0.7   0.6   0.5
    # FPR         0     0    1/3   1/3   2/3    1
    # FNR         1    1/2   1/2    0     0     0
    # FPR - FNR  -1   -1/2  -1/6   1/3   ...   -> t = (1/6) / (1/2) = 1/3 between 0.8 and 0.7:
    # FPR = 1/3, FNR = 1/2 - 1/3 * 1/2 = 1/3.
    scores = t64([0.9, 0.8, 0.7, 0.6, 0.5])
    same = torch.tensor([T, F, T, F, F])
    assert equal_error_rate(scores, same) == pytest.approx(1 / 3)


def test_best_threshold_hand_example():
    # Correct counts 3, 4, 5, 4, 5, 4, 3 of 6: the maximum 5/6 at 0.8 and 0.6; the lower,
    # 0.6, is taken and moved to the middle of the gap down to 0.5.
    threshold, accuracy = best_threshold(SCORES, SAME)
    assert threshold == pytest.approx(0.55)
    assert accuracy == pytest.approx(5 / 6)


def test_best_threshold_edges():
    # All negative: rejecting everything (+inf) is the only perfect threshold.
    assert best_threshold(t64([0.5, 0.2]), torch.tensor([F, F])) == (math.inf, 1.0)
    # All positive: accepting everything, i.e. the lowest score, unchanged.
    assert best_threshold(t64([0.5, 0.2]), torch.tensor([T, T])) == (0.2, 1.0)


def test_tar_at_far_hand_examples():
    # Main example, 3 negatives: FAR 0.1 needs 10 negatives -> None; FAR 0.3 needs 3.33 -> None.
    assert tar_at_far(SCORES, SAME, 0.1) is None
    assert tar_at_far(SCORES, SAME, 0.3) is None
    # FAR 0.34 (>= 1/3): thresholds down to 0.6 have FPR <= 1/3; TPR there is 1.
    assert tar_at_far(SCORES, SAME, 0.34) == pytest.approx(1.0)
    # Ten negatives: FAR 0.1 allows 1 false accept (0.95) -> threshold 0.6, TAR 3/4.
    assert tar_at_far(TEN_SCORES, TEN_SAME, 0.1) == pytest.approx(0.75)
    # FAR 0.3 allows 3 (0.95, 0.5, 0.45) but the 4th positive (0.4) is tied with a
    # negative: accepting it makes 4 false accepts, so TAR stays 3/4.
    assert tar_at_far(TEN_SCORES, TEN_SAME, 0.3) == pytest.approx(0.75)
    # FAR 0.4 allows 4: threshold 0.4, TAR 1.
    assert tar_at_far(TEN_SCORES, TEN_SAME, 0.4) == pytest.approx(1.0)
    # FAR 0.01 needs 100 negatives.
    assert tar_at_far(TEN_SCORES, TEN_SAME, 0.01) is None


def test_kfold_accuracy_perfectly_separable():
    # Positives in [0.8, 0.9], negatives in [0.1, 0.2], interleaved; whichever pairs are
    # held out, the midpoint threshold of the other folds lies in (0.2, 0.8).
    scores = torch.linspace(0.8, 0.9, 10, dtype=F64)
    negatives = torch.linspace(0.1, 0.2, 10, dtype=F64)
    scores = torch.stack([scores, negatives], 1).flatten()
    same = torch.tensor([T, F] * 10)
    assert kfold_accuracy(scores, same, folds=10) == (1.0, 0.0)


def test_kfold_accuracy_hand_example():
    # Main example, 3 folds: A = (0.9 T, 0.8 T), B = (0.7 F, 0.6 T), C = (0.5 F, 0.4 F).
    # Hold out A: train B+C correct counts inf 3, .7 2, .6 3, .5 2, .4 1 -> 0.6, midpoint
    #   with 0.5 = 0.55: A's 0.9 and 0.8 accepted, both T -> 1.
    # Hold out B: train A+C is separable at 0.8 -> midpoint with 0.5 = 0.65: 0.7 F accepted,
    #   0.6 T rejected -> 0.
    # Hold out C: train A+B counts inf 1, .9 2, .8 3, .7 2, .6 3 -> 0.6 (lowest score, kept):
    #   0.5 F and 0.4 F rejected -> 1.
    # Mean 2/3; population std sqrt(((1/3)^2 + (2/3)^2 + (1/3)^2) / 3) = sqrt(2) / 3.
    mean, std = kfold_accuracy(SCORES, SAME, folds=3)
    assert mean == pytest.approx(2 / 3)
    assert std == pytest.approx(math.sqrt(2) / 3)


def test_kfold_accuracy_uneven_folds():
    # 7 pairs in 3 folds: sizes 3, 2, 2 (the first P % folds folds get the extra pair).
    # Folds: (0.9 T, 0.8 T, 0.7 F) | (0.6 T, 0.5 F) | (0.4 F, 0.3 T).
    # Hold out 1: train .6T .5F .4F .3T -> counts inf 2, .6 3, .5 2, .4 1, .3 2 -> 0.6,
    #   midpoint 0.55: .9 ok, .8 ok, .7 F accepted -> 2/3.
    # Hold out 2: train .9T .8T .7F .4F .3T -> inf 2, .9 3, .8 4, .7 3, .4 2, .3 3 -> 0.8,
    #   midpoint 0.75: .6 T rejected, .5 F rejected -> 1/2.
    # Hold out 3: train .9T .8T .7F .6T .5F -> inf 2, .9 3, .8 4, .7 3, .6 4, .5 3 -> 0.6,
    #   midpoint 0.55: .4 F rejected, .3 T rejected -> 1/2.
    scores = t64([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    same = torch.tensor([T, T, F, T, F, F, T])
    # Mean 5/9; deviations 1/9, -1/18, -1/18: variance (4 + 1 + 1) / 324 / 3 = 1/162.
    mean, std = kfold_accuracy(scores, same, folds=3)
    assert mean == pytest.approx(5 / 9)
    assert std == pytest.approx(1 / math.sqrt(162))


def test_verification_report_values_and_json():
    report = verification_report(TEN_SCORES, TEN_SAME, folds=2)
    assert set(report) == {"accuracy", "accuracy_std", "tar_at_far", "eer", "roc_auc"}
    # 10 negatives resolve only FAR 1e-1.
    assert report["tar_at_far"] == {"1e-1": pytest.approx(0.75)}
    mean, std = kfold_accuracy(TEN_SCORES, TEN_SAME, folds=2)
    assert (report["accuracy"], report["accuracy_std"]) == (mean, std)
    assert report["eer"] == equal_error_rate(TEN_SCORES, TEN_SAME)
    # AUC = P(pos > neg) + 1/2 P(tie) over 40 pairs: 0.9, 0.8, 0.6 each beat 9 of 10
    # (all but 0.95); 0.4 beats 6 and ties 1 -> (27 + 6.5) / 40.
    assert report["roc_auc"] == pytest.approx(33.5 / 40)
    assert json.loads(json.dumps(report)) == report
    assert all(type(report[k]) is float for k in ("accuracy", "accuracy_std", "eer", "roc_auc"))


def test_verification_report_all_fars_with_enough_negatives():
    generator = torch.Generator().manual_seed(0)
    same = torch.rand(3000, generator=generator) < 0.3
    scores = torch.where(same, 1.0, 0.0) + torch.rand(3000, generator=generator, dtype=F64)
    report = verification_report(scores, same)
    assert set(report["tar_at_far"]) == {"1e-1", "1e-2", "1e-3"}
    assert 0.5 < report["accuracy"] <= 1.0


def test_input_validation():
    with pytest.raises(ValueError, match="same"):
        roc_curve(SCORES, SAME[:5])
    with pytest.raises(ValueError, match="scores"):
        roc_curve(t64([]), torch.tensor([], dtype=torch.bool))
    with pytest.raises(ValueError, match="same"):
        roc_curve(SCORES, torch.ones(6, dtype=torch.bool))  # no negatives
    with pytest.raises(ValueError, match="same"):
        roc_curve(SCORES, torch.ones(6))  # not bool
    with pytest.raises(ValueError, match="scores"):
        roc_curve(t64([0.1, math.nan]), torch.tensor([T, F]))
    with pytest.raises(ValueError, match="tpr"):
        roc_auc(t64([0, 1]), t64([0, 0.5, 1]))
    with pytest.raises(ValueError, match="far"):
        tar_at_far(SCORES, SAME, 0.0)
    with pytest.raises(ValueError, match="folds"):
        kfold_accuracy(SCORES, SAME, folds=7)
    with pytest.raises(ValueError, match="labels"):
        make_pairs(torch.tensor([0, 1, 2]))  # no positive pair
    with pytest.raises(ValueError, match="j"):
        pair_scores(torch.eye(3), torch.tensor([0, 1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="embeddings"):
        pair_scores(torch.ones(3), torch.tensor([0]), torch.tensor([1]))


# labels (0, 0, 0, 1, 1, 2): positives (0,1) (0,2) (1,2) (3,4); 15 - 4 = 11 negatives.
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])
POSITIVES = {(0, 1), (0, 2), (1, 2), (3, 4)}
NEGATIVES = {(i, j) for i in range(6) for j in range(i + 1, 6)} - POSITIVES


def pair_set(i, j, same, want):
    return {(a, b) for a, b, s in zip(i.tolist(), j.tolist(), same.tolist()) if s == want}


@pytest.mark.parametrize("ratio", [1, 2])  # 4 of 11 negatives (sampled) / 8 of 11 (enumerated)
def test_make_pairs_counts_and_determinism(ratio):
    i, j, same = make_pairs(LABELS, max_negatives_per_positive=ratio,
                            generator=torch.Generator().manual_seed(1))
    assert pair_set(i, j, same, True) == POSITIVES
    negatives = pair_set(i, j, same, False)
    assert len(negatives) == int((~same).sum()) == 4 * ratio  # distinct
    assert negatives <= NEGATIVES
    again = make_pairs(LABELS, max_negatives_per_positive=ratio,
                       generator=torch.Generator().manual_seed(1))
    for a, b in zip((i, j, same), again):
        assert torch.equal(a, b)


def test_make_pairs_takes_all_negatives_when_too_few():
    i, j, same = make_pairs(LABELS, max_negatives_per_positive=10,
                            generator=torch.Generator().manual_seed(0))
    assert pair_set(i, j, same, True) == POSITIVES
    assert pair_set(i, j, same, False) == NEGATIVES
    assert i.shape == (15,)


def test_make_pairs_large_set_is_valid_and_shuffled():
    labels = torch.arange(2000) % 100  # 100 ids x 20 samples: 19000 positives
    i, j, same = make_pairs(labels, generator=torch.Generator().manual_seed(0))
    assert int(same.sum()) == 100 * 20 * 19 // 2 and int((~same).sum()) == 19000
    assert bool((i < j).all())
    assert torch.equal(labels[i] == labels[j], same)
    assert len(set(zip(i.tolist(), j.tolist()))) == 38000
    # Shuffled: the first tenth holds both classes in roughly equal numbers.
    assert 1500 < int(same[:3800].sum()) < 2300


def test_pair_scores_hand_example():
    # Rows (3, 4), (1, 0), (0, 2): cosines 3/5, 4/5 and 0.
    embeddings = t64([[3, 4], [1, 0], [0, 2]])
    scores = pair_scores(embeddings, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]))
    torch.testing.assert_close(scores, t64([0.6, 0.8, 0.0]))
