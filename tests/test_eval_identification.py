"""Identification metrics and the Gallery on hand-checkable 2-D embeddings.

Gallery throughout: g0 = (1, 0) label 0, g1 = (0, 1) label 1, g2 = (-1, 0) label 2, so a
unit probe (x, y) scores x, y and -x against them."""

import math

import pytest
import torch

from facekernels.eval import Gallery, open_set_identification, rank1_accuracy

F64 = torch.float64
GALLERY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=F64)
GALLERY_LABELS = torch.tensor([0, 1, 2])

# Genuine probes (label, vector) -> top match, score:
#   A  0  (1, 0)         -> g0 1.0  correct
#   B  1  (0.6, 0.8)     -> g1 0.8  correct
#   C  2  (0.8, 0.6)     -> g0 0.8  wrong
#   D  2  (-0.6, -0.8)   -> g2 0.6  correct
# Impostor probes (labels 5..8, not enrolled) -> max score:
#   (-0.96, 0.28) -> 0.96;  (0.7, -0.7) -> 1/sqrt(2) = 0.7071;  (0.28, -0.96) -> 0.28;
#   (0, -1) -> 0.0
PROBES = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [-0.6, -0.8],
                       [-0.96, 0.28], [0.7, -0.7], [0.28, -0.96], [0.0, -1.0]], dtype=F64)
PROBE_LABELS = torch.tensor([0, 1, 2, 2, 5, 6, 7, 8])


def test_rank1_accuracy_hand_example():
    # Probes (1, 0.2) -> g0 ok; (0.1, 1) -> g1 ok; (0.9, 0.8) labelled 1 -> g0 (0.9 > 0.8)
    # wrong; (-1, -0.1) -> g2 ok: 3/4.
    probes = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.9, 0.8], [-1.0, -0.1]])
    labels = torch.tensor([0, 1, 1, 2])
    assert rank1_accuracy(GALLERY.float(), GALLERY_LABELS, probes, labels) == pytest.approx(0.75)
    # The genuine probes above: A, B, D right, C wrong.
    assert rank1_accuracy(GALLERY, GALLERY_LABELS, PROBES[:4], PROBE_LABELS[:4]) == 0.75


def test_rank1_accuracy_is_scale_invariant():
    assert rank1_accuracy(5 * GALLERY, GALLERY_LABELS, 0.1 * PROBES[:4], PROBE_LABELS[:4]) == 0.75


@pytest.mark.parametrize("far, cut, expected_dir, expected_far", [
    # floor(0.25 * 4) = 1 impostor may pass: threshold just above the 2nd impostor score
    # 0.7071; A (1.0) and B (0.8) pass, D (0.6) does not, C is wrong -> DIR 2/4.
    (0.25, 1 / math.sqrt(2), 0.5, 0.25),
    # 2 may pass: just above 0.28; A, B, D -> 3/4.
    (0.5, 0.28, 0.75, 0.5),
    # floor(0.1 * 4) = 0: just above 0.96; only A -> 1/4, no impostor accepted.
    (0.1, 0.96, 0.25, 0.0),
])
def test_open_set_identification_hand_example(far, cut, expected_dir, expected_far):
    result = open_set_identification(GALLERY, GALLERY_LABELS, PROBES, PROBE_LABELS, far)
    assert set(result) == {"threshold", "dir", "far"}
    assert result["threshold"] > cut
    assert result["threshold"] == pytest.approx(cut, abs=1e-12)
    assert result["dir"] == expected_dir
    assert result["far"] == expected_far


def test_open_set_identification_tied_impostors_are_rejected_together():
    # Impostor scores 0.8, 0.8, 0.28, 0.0; FAR 0.25 allows one, but the two 0.8s are tied:
    # the smallest threshold accepting at most one is just above 0.8, accepting none.
    # Genuine: A (1.0) only -> DIR 1/4 (B's 0.8 is no longer enough).
    probes = PROBES.clone()
    probes[4] = torch.tensor([-0.8, 0.6], dtype=F64)  # -> g2 0.8
    probes[5] = torch.tensor([-0.8, -0.6], dtype=F64)  # -> g2 0.8
    result = open_set_identification(GALLERY, GALLERY_LABELS, probes, PROBE_LABELS, 0.25)
    assert result["threshold"] == pytest.approx(0.8, abs=1e-12)
    assert result["far"] == 0.0
    assert result["dir"] == 0.25


def test_identification_input_validation():
    with pytest.raises(ValueError, match="gallery_labels"):
        rank1_accuracy(GALLERY, GALLERY_LABELS[:2], PROBES, PROBE_LABELS)
    with pytest.raises(ValueError, match="probe_emb"):
        rank1_accuracy(GALLERY, GALLERY_LABELS, torch.ones(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="probe_emb"):
        rank1_accuracy(GALLERY, GALLERY_LABELS, torch.ones(0, 2), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="probe_labels"):  # no impostors
        open_set_identification(GALLERY, GALLERY_LABELS, PROBES[:4], PROBE_LABELS[:4], 0.1)
    with pytest.raises(ValueError, match="far"):
        open_set_identification(GALLERY, GALLERY_LABELS, PROBES, PROBE_LABELS, 1.0)


def test_gallery_enroll_identify_and_late_enrollment():
    gallery = Gallery()
    assert len(gallery) == 0
    # Person 10: samples (2, 0) and (0.8, 0.6) -> normalized mean (1.8, 0.6)/2, template
    # (3, 1)/sqrt(10). Person 20: (0, 3) -> template (0, 1).
    gallery.enroll(torch.tensor([[2.0, 0.0], [0.8, 0.6], [0.0, 3.0]]), torch.tensor([10, 10, 20]))
    assert len(gallery) == 2
    assert gallery.labels.tolist() == [10, 20]
    torch.testing.assert_close(gallery.templates,
                               torch.tensor([[3.0, 1.0], [0.0, math.sqrt(10)]], dtype=F64) / math.sqrt(10))

    # (3, 1) matches person 10 exactly; (0, 2) person 20; (-1, 0) scores -3/sqrt(10) and 0,
    # so its best is person 20 at 0.0, below threshold 0.5 -> unknown.
    probes = torch.tensor([[3.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    labels, scores = gallery.identify(probes)
    assert labels.tolist() == [10, 20, 20]
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    labels, _ = gallery.identify(probes, threshold=0.5)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [10, 20, -1]

    # A new person, 30, enrolled later without touching the others.
    gallery.enroll(torch.tensor([[-1.0, 0.0]]), torch.tensor([30]))
    assert len(gallery) == 3
    labels, scores = gallery.identify(probes, threshold=0.5)
    assert labels.tolist() == [10, 20, 30]
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 1.0], dtype=F64))


def test_gallery_more_samples_update_the_template():
    gallery = Gallery()
    gallery.enroll(torch.tensor([[3.0, 1.0], [0.0, 1.0]]), torch.tensor([10, 20]))
    # Person 20 gains (1, 0): template (0, 1) + (1, 0) normalized = (1, 1)/sqrt(2). Probe
    # (1, 1) now scores 1 against 20 and (3 + 1)/sqrt(20) = 0.894 against 10.
    gallery.enroll(torch.tensor([[5.0, 0.0]]), torch.tensor([20]))
    assert len(gallery) == 2
    torch.testing.assert_close(gallery.templates[1], torch.tensor([1.0, 1.0], dtype=F64) / math.sqrt(2))
    labels, scores = gallery.identify(torch.tensor([[1.0, 1.0]]))
    assert labels.tolist() == [20]
    assert scores.item() == pytest.approx(1.0)


def test_gallery_validation():
    gallery = Gallery()
    with pytest.raises(ValueError, match="empty"):
        gallery.identify(torch.ones(1, 2))
    with pytest.raises(ValueError, match="labels"):
        gallery.enroll(torch.ones(2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels"):
        gallery.enroll(torch.ones(1, 2), torch.tensor([-1]))
    gallery.enroll(torch.ones(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="embeddings"):
        gallery.identify(torch.ones(1, 3))
    with pytest.raises(ValueError, match="embeddings"):
        gallery.enroll(torch.ones(1, 3), torch.tensor([1]))
