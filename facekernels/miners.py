"""Miners with pytorch-metric-learning's index contract: they return index tensors usable
directly as a loss's indices_tuple."""

from torch import nn

from facekernels.metric_options import ReadsDistance, check_no_stats
from facekernels.ops.checks import check_choice, check_number
from facekernels.ops.triplet import TRIPLET_TYPES, mine_triplets


class TripletMiner(ReadsDistance, nn.Module):
    """Mines triplets (a, p, n) in one pass over the pairwise distances, in O(N^2) memory;
    a drop-in for pytorch-metric-learning's TripletMarginMiner.

    Args:
        margin: the miner's margin.
        type_of_triplets: "all" | "hard" | "semihard" | "easy" (PML's TripletMarginMiner
            semantics, t = d_an - d_ap), "batch_hard" (PML's BatchHardMiner: per anchor
            the farthest positive and the nearest negative) or "facenet" (per positive
            pair FaceNet's semi-hard negative, else the farthest). Anything else is a
            ValueError (PML silently falls back to "all").
        distance: "euclidean" (default) | "squared_euclidean" | "cosine" (a similarity, as
            PML's CosineSimilarity: t = s_ap - s_an), or PML's LpDistance(p=2, power=1 or
            2), CosineSimilarity(), DotProductSimilarity() objects.
        normalize_embeddings: L2-normalize the embeddings first; None: True for a string
            distance (PML's default), the object's own setting for a PML distance.
        collect_stats: PML's statistics recording; only False is supported.

    ``a, p, n = miner(embeddings, labels, ref_emb=None, ref_labels=None)``: int64 on the
    embeddings' device, lexicographically ordered, identical run to run. Labels may have
    any integer dtype; an empty batch gives empty tensors.
    """

    def __init__(self, margin=0.2, type_of_triplets="all", distance=None, *,
                 normalize_embeddings=None, collect_stats=False):
        super().__init__()
        check_choice("TripletMiner", "type_of_triplets", type_of_triplets, TRIPLET_TYPES)
        self.margin = check_number("TripletMiner", "margin", margin)
        self._set_distance("TripletMiner", distance, normalize_embeddings)
        check_no_stats("TripletMiner", collect_stats)
        self.type_of_triplets = type_of_triplets

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        self._read_distance()
        return mine_triplets(
            embeddings, labels, margin=self.margin, type_of_triplets=self.type_of_triplets,
            distance=self._distance, normalize_embeddings=self.normalize_embeddings,
            ref_emb=ref_emb, ref_labels=ref_labels,
        )

    def extra_repr(self):
        return f"margin={self.margin}, type_of_triplets={self.type_of_triplets!r}, distance={self._distance!r}"
