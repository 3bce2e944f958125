"""Every op refuses a tensor argument on another device than the others (issue: a `meta`
tensor among CPU ones reached the fake kernel and returned uninitialized memory; a CPU
tensor given to a CUDA kernel is a host pointer). Checked for every tensor argument of
every op, not case by case."""

import pytest
import torch

import facekernels  # noqa: F401  (registers the ops)
from facekernels.ops.margin_softmax import margin_softmax_rows

G = torch.Generator().manual_seed(0)
N, D, C = 6, 4, 9
X = torch.randn(N, D, generator=G)
W = torch.randn(C, D, generator=G)
Y = torch.tensor([0, 1, 2, 0, 1, 2])
ROW = torch.full((N,), 0.3)
MARGIN = dict(scale=16.0, m1=1.0, m2=0.5, m3=0.0, sphere_lambda=0.0, margin_kind=0, exact_gradient=True,
              normalize_embeddings=True, normalize_weight=True, chunk_size=4)
MARGIN_TENSORS = dict(rows=torch.tensor([0, 2, 4, 5, 7]), row_m2=ROW, row_m3=ROW, hard_threshold=ROW,
                      hard_t=ROW)
DIST = torch.cdist(X, X)

# op: (its tensor arguments in schema order, its other arguments)
OPS = {
    "adaface_margins": (dict(embeddings=X, mean=torch.tensor([20.0]), std=torch.tensor([100.0])),
                        dict(h=0.333, margin=0.4, t_alpha=0.1, training=True)),
    "margin_softmax_forward": (dict(embeddings=X, weight=W, labels=Y, **MARGIN_TENSORS), MARGIN),
    "margin_softmax_backward": (
        dict(grad_log_sum=torch.ones(N), grad_target=torch.ones(N), embeddings=X, weight=W, labels=Y,
             row_max=torch.zeros(N), log_sum=torch.zeros(N), **MARGIN_TENSORS), MARGIN),
    "triplet_margin_forward": (dict(dist=DIST, labels=Y, ref_labels=Y),
                               dict(margin=0.2, mining=0, self_ref=True, smooth=False)),
    "triplet_mine": (dict(dist=DIST, labels=Y, ref_labels=Y), dict(margin=0.2, mining=0, self_ref=True)),
    "center_loss_forward": (dict(embeddings=X, labels=Y, centers=W), dict(alpha=0.5, compute_update=True)),
    "center_loss_backward": (dict(grad_loss=torch.tensor(1.0), diff=X, labels=Y),
                             dict(num_classes=C, centers_grad=True)),
    "center_loss_update_": (dict(centers=W.clone(), labels=Y, updated_centers=X), {}),
    "pairwise_distance": (dict(x=X, ref=X), dict(self_ref=True, squared=False)),
    "pairwise_distance_backward": (dict(grad=DIST, dist=DIST, x=X, ref=X), dict(squared=False)),
}
CASES = [(op, name) for op, (tensors, _) in OPS.items() for name in tensors]


@pytest.mark.parametrize("op, argument", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_a_tensor_on_another_device_is_an_error_naming_it(op, argument):
    tensors, options = OPS[op]
    moved = {**tensors, argument: tensors[argument].to("meta")}
    with pytest.raises(ValueError, match=rf"\b{argument} is on meta\b|but {argument} is on meta"):
        getattr(torch.ops.facekernels, op)(**moved, **options)


def test_the_reported_case_rows_on_meta():
    with pytest.raises(ValueError, match="rows is on meta but embeddings is on cpu"):
        margin_softmax_rows(X, W, Y, kind=0, scale=16.0, m1=1.0, m2=0.5, m3=0.0, sphere_lambda=0.0,
                            gradient="exact", normalize_embeddings=True, normalize_weight=True,
                            chunk_size=4, rows=torch.tensor([0, 2, 4], device="meta"))


def test_every_argument_on_meta_still_gives_shapes():
    """A whole call on meta (shape propagation) is consistent and allowed."""
    tensors, options = OPS["margin_softmax_forward"]
    out = torch.ops.facekernels.margin_softmax_forward(
        **{name: t.to("meta") for name, t in tensors.items()}, **options)
    assert all(t.device.type == "meta" for t in out) and out[0].shape == (N,)
