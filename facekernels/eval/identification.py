"""Face identification metrics (closed-set rank-1, open-set DIR at FAR) and a Gallery that
identifies by cosine similarity to enrolled identity templates.

Similarities are cosine (embeddings are L2-normalized here) and a match is accepted when
``score >= threshold``, as in ``facekernels.eval.verification``. Embeddings must be finite:
a NaN or inf row is a ValueError naming the argument and the row, as it has no honest
best match.
"""

import math

import torch
import torch.nn.functional as F

from facekernels.eval._checks import as_tensor, check_embeddings, check_finite, check_integer, check_real

# Probes scored per matrix product, bounding memory at CHUNK x gallery size.
_CHUNK = 4096


def _check_embeddings(op, name, embeddings, dim=None):
    embeddings = check_embeddings(op, name, embeddings, dim)
    check_finite(op, name, embeddings)
    return embeddings


def _check_labels(op, name, labels, n, embeddings_name):
    labels = as_tensor(op, name, labels)
    check_integer(op, name, labels)
    if labels.shape != (n,):
        raise ValueError(f"{op}: {name} has shape {tuple(labels.shape)}, expected ({n},) to match "
                         f"{embeddings_name}")
    return labels.cpu().long()


def _check_gallery_and_probes(op, gallery_emb, gallery_labels, probe_emb, probe_labels):
    gallery_emb = _check_embeddings(op, "gallery_emb", gallery_emb)
    gallery_labels = _check_labels(op, "gallery_labels", gallery_labels, gallery_emb.shape[0], "gallery_emb")
    probe_emb = _check_embeddings(op, "probe_emb", probe_emb, gallery_emb.shape[1])
    probe_labels = _check_labels(op, "probe_labels", probe_labels, probe_emb.shape[0], "probe_emb")
    return gallery_emb, gallery_labels, probe_emb, probe_labels


def _best_match(gallery, probes):
    """(score, index) of each probe's most cosine-similar gallery row, on the CPU.

    Half-precision inputs are scored in float32; scores keep float32/float64 otherwise."""
    dtype = torch.promote_types(gallery.dtype, torch.float32)
    gallery = F.normalize(gallery.to(dtype), dim=1)
    probes = F.normalize(probes.to(device=gallery.device, dtype=dtype), dim=1)
    scores, index = [], []
    for chunk in torch.split(probes, _CHUNK):
        best = (chunk @ gallery.T).max(dim=1)
        scores.append(best.values.cpu())
        index.append(best.indices.cpu())
    return torch.cat(scores), torch.cat(index)


def rank1_accuracy(gallery_emb, gallery_labels, probe_emb, probe_labels):
    """Closed-set rank-1 identification rate: the fraction of probes whose most
    cosine-similar gallery entry carries the probe's label (exact ties go to the first
    gallery entry).

    Args:
        gallery_emb: float [G, D]; gallery_labels: int [G].
        probe_emb: float [Q, D]; probe_labels: int [Q].

    Returns:
        A Python float in [0, 1].
    """
    gallery_emb, gallery_labels, probe_emb, probe_labels = _check_gallery_and_probes(
        "rank1_accuracy", gallery_emb, gallery_labels, probe_emb, probe_labels)
    _, index = _best_match(gallery_emb, probe_emb)
    return float((gallery_labels[index] == probe_labels).double().mean())


def open_set_identification(gallery_emb, gallery_labels, probe_emb, probe_labels, far):
    """Open-set identification: detection and identification rate (DIR) at a false alarm
    rate, as in NIST FRVT's identification reports (Grother & Ngan), rank 1.

    "K+1" formulation: probes whose label is in the gallery are genuine (mated), all others
    are impostors (non-mated). Each probe's score is its maximum gallery similarity. The
    threshold is the smallest one that accepts at most ``floor(far * n_impostors)``
    impostor probes; since acceptance is ``score >= threshold``, that is the next float
    above the impostor score ranked just past that count, so tied impostors at the cut
    are all rejected and the achieved rate may fall below ``far``.

    Args:
        gallery_emb: float [G, D]; gallery_labels: int [G].
        probe_emb: float [Q, D]; probe_labels: int [Q] (needs genuine and impostor probes).
        far: the target false alarm rate, in (0, 1).

    Returns:
        dict of Python floats: "threshold"; "dir", the fraction of genuine probes whose top
        match has their label and scores >= threshold; "far", the fraction of impostor
        probes scoring >= threshold.
    """
    op = "open_set_identification"
    far = check_real(op, "far", far)
    if not 0.0 < far < 1.0:
        raise ValueError(f"{op}: far must be in (0, 1), got {far}")
    gallery_emb, gallery_labels, probe_emb, probe_labels = _check_gallery_and_probes(
        op, gallery_emb, gallery_labels, probe_emb, probe_labels)

    genuine = torch.isin(probe_labels, gallery_labels)
    n_genuine, n_impostor = int(genuine.sum()), int((~genuine).sum())
    if n_genuine == 0 or n_impostor == 0:
        raise ValueError(
            f"{op}: probe_labels needs probes both enrolled and not enrolled in gallery_labels, "
            f"got {n_genuine} enrolled and {n_impostor} not"
        )
    scores, index = _best_match(gallery_emb, probe_emb)

    allowed = math.floor(far * n_impostor + 1e-9)  # slack for decimal FARs, e.g. 0.1 * 30
    impostor_scores = torch.sort(scores[~genuine], descending=True).values
    cut = impostor_scores[allowed]  # allowed < n_impostor as far < 1
    threshold = torch.nextafter(cut, torch.tensor(math.inf, dtype=cut.dtype))

    accepted = scores >= threshold
    correct = gallery_labels[index] == probe_labels
    return {
        "threshold": float(threshold),
        "dir": float((accepted & correct)[genuine].double().mean()),
        "far": float(accepted[~genuine].double().mean()),
    }


class Gallery:
    """Identification by verification against enrolled identities: each identity is a
    template, the L2-normalized mean of its L2-normalized samples, and a probe takes the
    label of its most cosine-similar template. New people are enrolled without retraining.

    ``gallery.enroll(embeddings, labels)`` adds samples (several per identity allowed;
    samples of an identity already enrolled update its template, as if all had been
    enrolled together). ``gallery.identify(embeddings, threshold=None)`` returns
    ``(labels, scores)``. ``len(gallery)`` is the number of identities. Labels must be
    non-negative: -1 is reserved for "unknown".
    """

    def __init__(self):
        self._labels = torch.empty(0, dtype=torch.int64)
        self._sums = None  # [K, D] float64 sums of normalized samples, one row per identity

    def __len__(self):
        return self._labels.numel()

    @property
    def labels(self):
        """int64 [K]: the enrolled identities, in order of first enrollment."""
        return self._labels.clone()

    @property
    def templates(self):
        """float64 [K, D]: the identities' unit-norm templates, rows matching ``labels``."""
        if self._sums is None:
            return torch.empty(0, 0, dtype=torch.float64)
        return F.normalize(self._sums, dim=1)

    def enroll(self, embeddings, labels):
        """Adds samples ``embeddings`` float [N, D] of identities ``labels`` int [N] (>= 0)."""
        dim = None if self._sums is None else self._sums.shape[1]
        embeddings = _check_embeddings("Gallery.enroll", "embeddings", embeddings, dim)
        labels = _check_labels("Gallery.enroll", "labels", labels, embeddings.shape[0], "embeddings")
        if (labels < 0).any():
            raise ValueError("Gallery.enroll: labels must be non-negative: -1 means unknown in identify()")
        samples = F.normalize(embeddings.cpu().double(), dim=1)

        new = torch.unique(labels[~torch.isin(labels, self._labels)])
        all_labels = torch.cat([self._labels, new])
        sums = torch.zeros(all_labels.numel(), samples.shape[1], dtype=torch.float64)
        if self._sums is not None:
            sums[: self._labels.numel()] = self._sums
        # Row of each sample's identity: all_labels is not sorted, so look it up by sorting.
        sorted_labels, perm = torch.sort(all_labels)
        rows = perm[torch.searchsorted(sorted_labels, labels)]
        sums.index_add_(0, rows, samples)
        self._labels, self._sums = all_labels, sums

    def identify(self, embeddings, threshold=None):
        """The best-matching identity of each probe in ``embeddings`` float [Q, D].

        Returns:
            (labels, scores): int64 [Q] enrolled labels, -1 where ``threshold`` is given
            and the best cosine similarity is below it; float64 [Q] best similarities.
        """
        op = "Gallery.identify"
        if self._sums is None:
            raise ValueError(f"{op}: the gallery is empty: enroll() identities first")
        embeddings = _check_embeddings(op, "embeddings", embeddings, self._sums.shape[1])
        if threshold is not None:
            threshold = check_real(op, "threshold", threshold)  # +-inf: accept all / none
        scores, index = _best_match(self._sums, embeddings.cpu())
        labels = self._labels[index]
        if threshold is not None:
            labels = torch.where(scores >= threshold, labels, torch.full_like(labels, -1))
        return labels, scores
