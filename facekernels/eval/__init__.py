"""Face-recognition evaluation: verification (ROC, TAR@FAR, EER, LFW 10-fold accuracy),
identification (rank-1, open-set DIR@FAR, enrollment Gallery) and LFW pairs files."""

from .identification import Gallery, open_set_identification, rank1_accuracy
from .lfw import lfw_image_path, read_lfw_pairs
from .verification import (
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

__all__ = [
    "Gallery",
    "best_threshold",
    "equal_error_rate",
    "kfold_accuracy",
    "lfw_image_path",
    "make_pairs",
    "open_set_identification",
    "pair_scores",
    "rank1_accuracy",
    "read_lfw_pairs",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "verification_report",
]
