"""Verification baselines on the same held-out pairs: raw pixels and Eigenfaces."""

import torch

from facekernels.eval import pair_scores, verification_report
from facekernels.train.data import center_crop
from facekernels.train.loop import FOLDS


def _pixels(faces):
    return center_crop(faces.images).flatten(1)


def raw_pixels(held_out, pairs):
    """Cosine similarity of the raw (center-cropped) pixels."""
    i, j, same = pairs
    return verification_report(pair_scores(_pixels(held_out), i, j), same, FOLDS)


def eigenfaces(train_set, held_out, pairs, components=64):
    """Eigenfaces (Turk & Pentland 1991): PCA fitted on the training people's photos; faces
    are compared by the cosine of their mean-centred projections."""
    train = _pixels(train_set).double()
    mean = train.mean(0)
    _, _, basis = torch.linalg.svd(train - mean, full_matrices=False)
    basis = basis[: min(components, basis.shape[0])]
    projected = (_pixels(held_out).double() - mean) @ basis.t()
    i, j, same = pairs
    return verification_report(pair_scores(projected, i, j), same, FOLDS)
