"""Bad input to facekernels.eval: a ValueError or TypeError naming the function and the
argument, raised before any state changes; NaN only where it is the honest answer."""

import math

import pytest
import torch

from facekernels.eval import (
    Gallery,
    best_threshold,
    equal_error_rate,
    kfold_accuracy,
    lfw_image_path,
    make_pairs,
    open_set_identification,
    pair_scores,
    rank1_accuracy,
    read_lfw_pairs,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_report,
)

F64 = torch.float64
GALLERY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=F64)
GALLERY_LABELS = torch.tensor([0, 1, 2])
# Two genuine probes, then two impostors (labels 7, 8 are not enrolled).
PROBES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.0, -1.0]], dtype=F64)
PROBE_LABELS = torch.tensor([0, 1, 7, 8])
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], dtype=F64)
SAME = torch.tensor([True, False] * 5)


def with_value(tensor, row, value):
    tensor = tensor.clone()
    tensor[row] = value
    return tensor


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_identification_rejects_non_finite_probes(bad):
    # Before: the NaN probe matched gallery row 0 with score NaN and counted as identified.
    probes = with_value(PROBES, 3, bad)
    with pytest.raises(ValueError, match=r"^rank1_accuracy: probe_emb has non-finite values in row 3$"):
        rank1_accuracy(GALLERY, GALLERY_LABELS, probes, PROBE_LABELS)
    # Before: the NaN impostor was rejected, so FAR read 0.0 where it is 0.5.
    with pytest.raises(ValueError, match=r"^open_set_identification: probe_emb has non-finite values in row 3$"):
        open_set_identification(GALLERY, GALLERY_LABELS, probes, PROBE_LABELS, 0.5)
    gallery = Gallery()
    gallery.enroll(GALLERY, GALLERY_LABELS)
    with pytest.raises(ValueError, match=r"^Gallery.identify: embeddings has non-finite values in row 3$"):
        gallery.identify(probes)


def test_identification_rejects_a_non_finite_gallery():
    # Before: a NaN gallery row won every probe's max.
    gallery_emb = with_value(GALLERY, 1, math.nan)
    with pytest.raises(ValueError, match=r"^rank1_accuracy: gallery_emb has non-finite values in row 1$"):
        rank1_accuracy(gallery_emb, GALLERY_LABELS, PROBES, PROBE_LABELS)
    with pytest.raises(ValueError, match=r"^open_set_identification: gallery_emb has non-finite values"):
        open_set_identification(gallery_emb, GALLERY_LABELS, PROBES, PROBE_LABELS, 0.5)


def test_gallery_enroll_rejects_non_finite_and_keeps_its_state():
    gallery = Gallery()
    gallery.enroll(GALLERY, GALLERY_LABELS)
    labels, templates = gallery.labels, gallery.templates
    with pytest.raises(ValueError, match=r"^Gallery.enroll: embeddings has non-finite values in row 1$"):
        gallery.enroll(torch.tensor([[1.0, 1.0], [math.inf, 0.0]]), torch.tensor([1, 5]))
    assert torch.equal(gallery.labels, labels) and torch.equal(gallery.templates, templates)


@pytest.mark.parametrize("threshold, error", [(math.nan, ValueError), ("0.5", TypeError)])
def test_gallery_identify_rejects_a_bad_threshold(threshold, error):
    gallery = Gallery()
    gallery.enroll(GALLERY, GALLERY_LABELS)
    # Before: NaN turned every probe into "unknown".
    with pytest.raises(error, match="^Gallery.identify: threshold"):
        gallery.identify(PROBES, threshold=threshold)


def test_gallery_identify_infinite_thresholds_are_defined():
    gallery = Gallery()
    gallery.enroll(GALLERY, GALLERY_LABELS)
    assert gallery.identify(PROBES, threshold=math.inf)[0].tolist() == [-1] * 4  # reject all
    assert gallery.identify(PROBES, threshold=-math.inf)[0].tolist() == [0, 1, 0, 0]  # accept all


@pytest.mark.parametrize("far, error", [(math.nan, ValueError), ("x", TypeError), (True, TypeError)])
def test_open_set_identification_far(far, error):
    with pytest.raises(error, match="^open_set_identification: far"):
        open_set_identification(GALLERY, GALLERY_LABELS, PROBES, PROBE_LABELS, far)


def test_identification_names_unreadable_arguments():
    with pytest.raises(TypeError, match="^rank1_accuracy: gallery_emb must be a tensor"):
        rank1_accuracy("faces", GALLERY_LABELS, PROBES, PROBE_LABELS)
    with pytest.raises(TypeError, match="^Gallery.enroll: labels must be a tensor"):
        Gallery().enroll(GALLERY, [0, "one", 2])


@pytest.mark.parametrize("op, call", [
    ("roc_curve", lambda s: roc_curve(s, SAME)),
    ("equal_error_rate", lambda s: equal_error_rate(s, SAME)),
    ("best_threshold", lambda s: best_threshold(s, SAME)),
    ("tar_at_far", lambda s: tar_at_far(s, SAME, 0.5)),
    ("kfold_accuracy", lambda s: kfold_accuracy(s, SAME, 2)),
    ("verification_report", lambda s: verification_report(s, SAME, 2)),
])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_verification_rejects_non_finite_scores_by_index(op, call, bad):
    with pytest.raises(ValueError, match=rf"^{op}: scores has non-finite values at index 4$"):
        call(with_value(SCORES, 4, bad))


@pytest.mark.parametrize("folds, error", [
    (math.nan, TypeError),  # reported: "folds=NaN names no argument"
    (2.5, TypeError),  # was truncated to 2
    ("3", TypeError),
    (True, TypeError),
    (1, ValueError),
    (11, ValueError),  # more folds than the 10 pairs
])
def test_folds_must_be_an_int_in_range(folds, error):
    with pytest.raises(error, match="^kfold_accuracy: .*folds"):
        kfold_accuracy(SCORES, SAME, folds)
    with pytest.raises(error, match="^verification_report: .*folds"):
        verification_report(SCORES, SAME, folds)


def test_folds_accepts_integer_scalars():
    assert kfold_accuracy(SCORES, SAME, torch.tensor(2)) == kfold_accuracy(SCORES, SAME, 2)


def test_verification_report_names_itself():
    with pytest.raises(ValueError, match="^verification_report: same needs both"):
        verification_report(SCORES, torch.ones(10, dtype=torch.bool))
    with pytest.raises(TypeError, match="^verification_report: scores must be a tensor"):
        verification_report("scores", SAME)


@pytest.mark.parametrize("far, error", [(math.nan, ValueError), ("x", TypeError), (0.0, ValueError)])
def test_tar_at_far_far(far, error):
    with pytest.raises(error, match="^tar_at_far: far"):
        tar_at_far(SCORES, SAME, far)


def test_roc_auc_rejects_what_has_no_area():
    fpr, tpr = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    assert roc_auc(fpr, tpr) == 0.75
    with pytest.raises(ValueError, match=r"^roc_auc: fpr has non-finite values at index 1$"):
        roc_auc(with_value(fpr, 1, math.nan), tpr)  # was a silent NaN area
    with pytest.raises(ValueError, match=r"^roc_auc: tpr has non-finite values at index 2$"):
        roc_auc(fpr, with_value(tpr, 2, math.inf))
    with pytest.raises(ValueError, match="^roc_auc: fpr must be non-decreasing"):
        roc_auc(fpr.flip(0), tpr)  # was a silent negative area


@pytest.mark.parametrize("ratio, error", [(math.nan, TypeError), (1.5, TypeError), (-1, ValueError)])
def test_make_pairs_ratio(ratio, error):
    with pytest.raises(error, match="^make_pairs: max_negatives_per_positive"):
        make_pairs(torch.tensor([0, 0, 1]), max_negatives_per_positive=ratio)


def test_pair_scores_indices_and_honest_nan():
    embeddings = torch.eye(3)
    # Before: -1 wrapped round to the last row silently.
    with pytest.raises(ValueError, match=r"^pair_scores: i must hold row indices in \[0, 3\)"):
        pair_scores(embeddings, torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^pair_scores: j must hold row indices in \[0, 3\)"):
        pair_scores(embeddings, torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="^pair_scores: i must be an integer tensor"):
        pair_scores(embeddings, torch.tensor([0.0]), torch.tensor([1.0]))
    # uint8 indices are indices, not a mask.
    assert pair_scores(embeddings, torch.tensor([0, 1], dtype=torch.uint8),
                       torch.tensor([0, 2], dtype=torch.uint8)).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="^pair_scores: embeddings must be floating point"):
        pair_scores(torch.ones(3, 2, dtype=torch.int64), torch.tensor([0]), torch.tensor([1]))
    # A NaN embedding has no similarity: its own pairs score NaN, the others are untouched,
    # and the metrics then refuse those scores by index.
    scores = pair_scores(with_value(embeddings, 2, math.nan), torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]))
    assert scores[0] == 0.0 and scores[1:].isnan().all()
    with pytest.raises(ValueError, match="^roc_curve: scores has non-finite values at index 1$"):
        roc_curve(scores, torch.tensor([True, False, False]))


def test_read_lfw_pairs_non_utf8_names_file_and_line(tmp_path):
    # Before: a bare UnicodeDecodeError with neither.
    path = tmp_path / "pairs.txt"
    path.write_bytes(b"1\nAaron_Peirsol 1 2\nJos\xe9_Mourinho 1 Marsha_Thomason 1\n")
    with pytest.raises(ValueError, match=r"pairs\.txt, line 3: not UTF-8 text"):
        read_lfw_pairs(path)


def test_read_lfw_pairs_header_without_pairs(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("10 0\n")  # was an empty list
    with pytest.raises(ValueError, match=r"pairs\.txt, line 1: header declares no pairs"):
        read_lfw_pairs(path)


@pytest.mark.parametrize("name, error", [(None, TypeError), (7, TypeError), ("", ValueError),
                                         ("a/b", ValueError), ("..", ValueError)])
def test_lfw_image_path_name(name, error):
    with pytest.raises(error, match="^lfw_image_path: name"):
        lfw_image_path("/data/lfw", name, 1)


@pytest.mark.parametrize("index, error", [(math.nan, TypeError), (1.7, TypeError), (0, ValueError)])
def test_lfw_image_path_index(index, error):
    # Before: NaN named no argument and 1.7 was truncated to image 1.
    with pytest.raises(error, match="^lfw_image_path: index"):
        lfw_image_path("/data/lfw", "Zico", index)
