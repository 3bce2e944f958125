"""The distance, reducer and recording arguments of the metric losses and miners: our
strings, or pytorch-metric-learning's own objects where a fused equivalent exists. PML is
never imported here: its objects are recognised by their exact class and module, so a
subclass (which may change the math) is refused rather than approximated."""

from facekernels.ops.checks import check_choice
from facekernels.ops.triplet import DISTANCES, REDUCTIONS

_PML_REDUCERS = {"AvgNonZeroReducer": "mean_nonzero", "MeanReducer": "mean", "SumReducer": "sum",
                 "DoNothingReducer": "none"}


def _pml_class(obj, package):
    """The class name of a pytorch-metric-learning object from `package`, else None."""
    cls = type(obj)
    return cls.__name__ if cls.__module__.startswith(f"pytorch_metric_learning.{package}.") else None


def resolve_distance(owner, distance, normalize_embeddings):
    """(name, normalize_embeddings): "euclidean", "squared_euclidean" or "cosine" (None:
    "euclidean"), or PML's LpDistance(p=2, power=1 or 2), CosineSimilarity(),
    DotProductSimilarity(); normalize_embeddings None means True, or the object's own."""
    if distance is None or isinstance(distance, str):
        name = "euclidean" if distance is None else distance
        check_choice(owner, "distance", name, DISTANCES)
        return name, True if normalize_embeddings is None else bool(normalize_embeddings)
    kind = _pml_class(distance, "distances")
    name = None
    if kind == "LpDistance" and distance.p == 2 and distance.power in (1, 2):
        name = "euclidean" if distance.power == 1 else "squared_euclidean"
    elif kind in ("CosineSimilarity", "DotProductSimilarity") and distance.power == 1:
        name = "cosine"
    if name is None:
        raise ValueError(
            f"{owner}: distance {distance!r} (p={getattr(distance, 'p', None)}, "
            f"power={getattr(distance, 'power', None)}) has no fused equivalent; use one of "
            f"{DISTANCES} or pytorch-metric-learning's LpDistance(p=2, power=1 or 2), "
            "CosineSimilarity() or DotProductSimilarity()"
        )
    if normalize_embeddings is not None and bool(normalize_embeddings) != distance.normalize_embeddings:
        raise ValueError(f"{owner}: normalize_embeddings={normalize_embeddings!r} contradicts "
                         f"distance.normalize_embeddings={distance.normalize_embeddings!r}")
    return name, distance.normalize_embeddings


class ReadsDistance:
    """pytorch-metric-learning's distance contract for a module: checked at construction,
    and read again at every call, as PML reads its distance object (whose p, power and
    normalize_embeddings a user may change after handing it over)."""

    def _set_distance(self, owner, distance, normalize_embeddings):
        self._owner, self._normalize_argument = owner, normalize_embeddings
        self._distance, self.normalize_embeddings = resolve_distance(owner, distance, normalize_embeddings)
        self.distance = self._distance if distance is None else distance

    def _read_distance(self):
        self._distance, self.normalize_embeddings = resolve_distance(
            self._owner, self.distance, self._normalize_argument)


def resolve_reducer(owner, reducer):
    """(reduction, as_loss_dict): "mean_nonzero" (None), "mean", "sum", "none", or PML's
    AvgNonZeroReducer(), MeanReducer(), SumReducer(), DoNothingReducer() (PML's loss dict)."""
    if reducer is None or isinstance(reducer, str):
        name = "mean_nonzero" if reducer is None else reducer
        check_choice(owner, "reducer", name, REDUCTIONS)
        return name, False
    kind = _pml_class(reducer, "reducers")
    if kind == "AvgNonZeroReducer" and (reducer.low != 0 or reducer.high is not None):
        kind = None
    if kind not in _PML_REDUCERS:
        raise ValueError(
            f"{owner}: reducer {reducer!r} has no fused equivalent; use one of {REDUCTIONS} or "
            "pytorch-metric-learning's AvgNonZeroReducer(), MeanReducer(), SumReducer() or "
            "DoNothingReducer()"
        )
    return _PML_REDUCERS[kind], kind == "DoNothingReducer"


def check_no_stats(owner, collect_stats):
    """PML's optional statistics recording is not implemented: only off is accepted."""
    if collect_stats:
        raise ValueError(f"{owner}: collect_stats=True (PML's statistics recording) is not "
                         "supported; leave it False")
