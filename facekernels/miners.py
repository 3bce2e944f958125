"""Miners with pytorch-metric-learning's index contract: they return index tensors usable
directly as a loss's indices_tuple."""

from torch import nn

from facekernels.ops.checks import check_choice
from facekernels.ops.triplet import DISTANCES, MINING, mine_triplets


class TripletMiner(nn.Module):
    """Mines triplets (a, p, n) in one pass over the pairwise distances, in O(N^2) memory.

    Args:
        margin: the miner's margin.
        type_of_triplets: "all" | "hard" | "semihard" | "easy" (PML's TripletMarginMiner
            semantics, t = d_an - d_ap), "batch_hard" (PML's BatchHardMiner: per anchor
            the farthest positive and the nearest negative) or "facenet" (per positive
            pair FaceNet's semi-hard negative, else the farthest). Anything else is a
            ValueError (PML silently falls back to "all").
        distance: "euclidean" | "squared_euclidean" | "cosine" (a similarity, as PML's
            CosineSimilarity: t = s_ap - s_an).
        normalize_embeddings: L2-normalize the embeddings first (PML's default).

    ``a, p, n = miner(embeddings, labels, ref_emb=None, ref_labels=None)``: int64 on the
    embeddings' device, lexicographically ordered, identical run to run.
    """

    def __init__(self, margin=0.2, type_of_triplets="all", distance="euclidean",
                 normalize_embeddings=True):
        super().__init__()
        check_choice("TripletMiner", "type_of_triplets", type_of_triplets, MINING)
        check_choice("TripletMiner", "distance", distance, DISTANCES)
        self.margin = margin
        self.type_of_triplets = type_of_triplets
        self.distance = distance
        self.normalize_embeddings = normalize_embeddings

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        return mine_triplets(
            embeddings, labels, margin=self.margin, type_of_triplets=self.type_of_triplets,
            distance=self.distance, normalize_embeddings=self.normalize_embeddings,
            ref_emb=ref_emb, ref_labels=ref_labels,
        )

    def extra_repr(self):
        return f"margin={self.margin}, type_of_triplets={self.type_of_triplets!r}, distance={self.distance!r}"
