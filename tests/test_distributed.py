"""PartialFC on gloo process groups spawned on the CPU (world sizes 1-3, class counts not
divisible by the world size), against one process holding the whole batch and weight."""

import copy
import json
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch._dynamo  # noqa: F401  (see worker)
import torch.distributed as dist
import torch.multiprocessing as mp

import facekernels
from arcface_torch.losses import ArcFace, CombinedMarginLoss, CosFace
from facekernels import reference
from facekernels.distributed import PartialFC, gather_weight, load_full_weight

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

B, D, C = 4, 6, 11  # local batch, width, classes (not divisible by 2 or 3)
MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.35), "combined": (1.0, 0.2, 0.1)}


def Margin(m1, m2, m3, interclass_filtering_threshold=0.0):  # noqa: N802
    """insightface's CombinedMarginLoss (our transcription) at s = 16."""
    return CombinedMarginLoss(16.0, m1, m2, m3, interclass_filtering_threshold)


def ours(margins, gradient):
    """facekernels' CombinedMarginLoss: the paper's combined margin (m2 kept with m3 > 0)."""
    return facekernels.CombinedMarginLoss(1, D, *margins, scale=16.0, gradient=gradient)


def global_batch(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (world * B,), generator=g)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    return x, y, w


def single_process(x, w, y, margins, gradient, classes=None):
    """Loss and gradients of the whole batch on one weight (classes: a subset of rows)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    weight, labels = w, y
    if classes is not None:
        weight, labels = w[classes], torch.searchsorted(classes, y)
    m1, m2, m3 = margins
    loss = facekernels.margin_softmax_loss(x, weight, labels, scale=16.0, m1=m1, m2=m2, m3=m3,
                                           gradient=gradient)
    return (loss.detach(), *torch.autograd.grad(loss, (x, w)))


def local(tensor, rank):
    return tensor[rank * B:(rank + 1) * B]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def worker(rank, world, init, task, args):
    # torch._dynamo is imported above, before any process group: imported while one is up
    # (DDP's first forward does so), it keeps the group's gloo threads alive past
    # destroy_process_group, and at exit one of them may free a finished collective's tensors
    # as Python finalizes: SIGABRT, "terminate called without an active exception" (about 1
    # run in 8 of train_v2 before this import).
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        task(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run(world, task, *args, tmp_path, timeout=90):
    """Runs task(rank, world, *args) on `world` spawned ranks; fails on an error in any rank
    or when they have not all finished within `timeout` seconds (a hang)."""
    init = f"file://{tmp_path}/init-{world}-{task.__name__}-{time.monotonic_ns()}"
    context = mp.start_processes(worker, args=(world, init, task, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{task.__name__} on {world} ranks did not finish in {timeout} s (a hang)")


def parity(rank, world):
    x, y, w = global_batch(world)
    for name, margins in MARGINS.items():
        for gradient in ("detached", "exact"):
            head = PartialFC(ours(margins, gradient), D, C).double()
            load_full_weight(head, w)
            mine = local(x, rank).clone().requires_grad_()
            loss = head(mine, local(y, rank))
            loss.backward()
            want, gx, gw = single_process(x, w, y, margins, gradient)
            close(loss.detach(), want)
            close(mine.grad, world * local(gx, rank))  # DDP's averaging divides by world
            close(head.weight.grad, gw[head.class_start:head.class_start + head.num_local])
    # fp32: the same, to 1e-5.
    head = PartialFC(facekernels.ArcFaceLoss(C, D, margin=0.5, scale=16.0), D, C, gradient="detached")
    load_full_weight(head, w.float())
    loss = head(local(x, rank).float(), local(y, rank))
    want = single_process(x, w, y, MARGINS["arcface"], "detached")[0]
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    # fp16=True: the GEMMs under float16 autocast, the weight and its gradient fp32.
    head = PartialFC(facekernels.ArcFaceLoss(C, D, margin=0.5, scale=16.0), D, C, fp16=True)
    load_full_weight(head, w.float())
    loss = head(local(x, rank).float(), local(y, rank))
    loss.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-2, atol=1e-2)
    assert head.weight.grad.dtype == torch.float32


def sampled_classes(head, world):
    """Every rank's sampled classes, in global numbering, rank by rank (sorted)."""
    rows = head.weight_index
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(rows)]))
    padded = torch.full((C,), -1, dtype=torch.int64)
    padded[:len(rows)] = rows + head.class_start
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])


def sampling(rank, world):
    x, y, w = global_batch(world, seed=1)
    head = PartialFC(Margin(*MARGINS["arcface"]), D, C, sample_rate=0.5,
                     generator=torch.Generator().manual_seed(rank)).double()
    load_full_weight(head, w)
    mine = local(x, rank).clone().requires_grad_()
    loss = head(mine, local(y, rank))
    loss.backward()
    rows = head.weight_index
    shard = (y >= head.class_start) & (y < head.class_start + head.num_local)
    positives = torch.unique(y[shard]) - head.class_start
    assert set(positives.tolist()) <= set(rows.tolist())
    assert len(rows) == max(head.num_sample, len(positives)) and torch.equal(rows, rows.sort().values)
    classes = sampled_classes(head, world)
    want, gx, gw = single_process(x, w, y, MARGINS["arcface"], "detached", classes=classes)
    close(loss.detach(), want)
    close(mine.grad, world * local(gx, rank))
    close(head.weight.grad, gw[head.class_start:head.class_start + head.num_local])
    untouched = torch.ones(head.num_local, dtype=torch.bool)
    untouched[rows] = False
    assert not head.weight.grad[untouched].any()


HEADS = {  # each made the same way on every rank and in the single process
    "arcface": lambda: facekernels.ArcFaceLoss(C, D, margin=0.5, scale=16.0),
    "cosface": lambda: facekernels.CosFaceLoss(C, D, margin=0.35, scale=16.0),
    "curricularface": lambda: facekernels.CurricularFaceLoss(C, D, margin=0.5, scale=16.0),
    "adaface": lambda: facekernels.AdaFaceLoss(C, D, scale=16.0, t_alpha=0.5),
    "magface": lambda: facekernels.MagFaceLoss(C, D, scale=16.0),
    "magface_arc": lambda: facekernels.MagFaceLoss(C, D, scale=16.0, easy_margin=False),
    "subcenter": lambda: facekernels.SubCenterArcFaceLoss(C, D, k=3, margin=0.4, scale=16.0),
    "elastic_arc": lambda: facekernels.ElasticFaceLoss(C, D, scale=16.0, std=0.05,
                                                       generator=torch.Generator().manual_seed(7)),
    "elastic_cos_plus": lambda: facekernels.ElasticFaceLoss(
        C, D, scale=16.0, std=0.05, kind="cos", plus=True, generator=torch.Generator().manual_seed(7)),
}


def every_head(rank, world):
    """Each head under PartialFC against the same head in one process on the global batch
    (on the sampled classes when sampling): loss, both gradients and the running buffers,
    over 3 steps."""
    for name, make in HEADS.items():
        for sample_rate in (1.0, 0.3):
            for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
                single = make().to(dtype)
                head = PartialFC(make(), D, C, sample_rate=sample_rate,
                                 generator=torch.Generator().manual_seed(10 + rank)).to(dtype)
                k = head.sub_centers
                for step in range(3):
                    x, y, _ = global_batch(world, seed=20 + step)
                    x = (20 * x).to(dtype)  # norms of 10 to 100: MagFace's and AdaFace's range
                    w = torch.randn(C * k, D, generator=torch.Generator().manual_seed(step), dtype=dtype)
                    load_full_weight(head, w)
                    mine = local(x, rank).clone().requires_grad_()
                    loss = head(mine, local(y, rank))
                    gx_local, gw_shard = torch.autograd.grad(loss, (mine, head.weight))
                    labels, weight = y, w
                    if sample_rate < 1:
                        classes = sampled_classes(head, world)
                        labels = torch.searchsorted(classes, y)
                        weight = w.view(C, k, D)[classes].reshape(-1, D)
                    xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
                    want = single.loss(xs, labels, ws)
                    gx, gws = torch.autograd.grad(want, (xs, ws))
                    gw = torch.zeros_like(w)
                    gw.view(C, k, D)[classes if sample_rate < 1 else slice(None)] = gws.view(-1, k, D)
                    message = f"{name} sample_rate={sample_rate} {dtype} step {step}"
                    check = lambda a, b: torch.testing.assert_close(  # noqa: E731
                        a, b, rtol=tolerance, atol=tolerance, msg=lambda m: f"{message}: {m}")
                    check(loss.detach(), want.detach())
                    check(gx_local, world * local(gx, rank))
                    check(gw_shard, gw[head.class_start * k:(head.class_start + head.num_local) * k])
                    for buffer in getattr(single, "running", ()):
                        check(getattr(head, buffer), getattr(single, buffer))
                assert sorted(head.state_dict()) == sorted(["weight", *getattr(single, "running", ())])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_head_sharded_equals_one_process(world, tmp_path):
    run(world, every_head, tmp_path=tmp_path, timeout=240)


def drop_in(rank, world, path):
    """What insightface's train_v2.py touches, against our PartialFC_V2 transcription."""
    from arcface_torch.partial_fc_v2 import PartialFC_V2
    x, _, w = global_batch(world, seed=4)
    x = (w[torch.arange(world * B) % C] + 0.3 * x).float()
    torch.manual_seed(0)
    theirs = PartialFC_V2(Margin(1.0, 0.5, 0.0), D, C, sample_rate=0.5)
    torch.manual_seed(0)
    mine = PartialFC(Margin(1.0, 0.5, 0.0), D, C, sample_rate=0.5)
    # The same initial weight from the same seed; checkpoints load both ways, strictly.
    assert torch.equal(mine.weight, theirs.weight) and list(mine.state_dict()) == ["weight"]
    theirs.load_state_dict(mine.state_dict())
    mine.load_state_dict(theirs.state_dict())
    for name in ("last_batch_size", "is_updated", "init_weight_update", "num_local",
                 "class_start", "num_sample", "rank", "world_size"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert all(callable(getattr(mine, name)) for name in ("margin_softmax", "dist_cross_entropy", "sample"))
    # Positives that fill each shard's sample exactly (2, 2 and 1 of them): insightface
    # still draws a rand over the shard, so the global generator's stream must match.
    y = torch.tensor([0, 1, 4, 5, 8, 0, 1, 4, 5, 8, 0, 4][:world * B])
    results = []
    for module in (theirs, mine):
        torch.manual_seed(5)
        labels = local(y, rank).clone()[:, None]  # [B, 1], as insightface's data loader gives
        loss = module(local(x, rank), labels)
        results.append((loss.detach(), module.weight_index.clone(), torch.rand(4),
                        *torch.autograd.grad(loss, module.weight)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert mine.last_batch_size == B
    # The margin is read at every forward: a warm-up that changes s and m2 takes effect.
    mine.margin_softmax.s, mine.margin_softmax.m2 = 20.0, 0.3
    loss = mine(local(x, rank).double(), local(y, rank))
    classes = sampled_classes(mine, world)
    want = facekernels.margin_softmax_loss(x.double(), full_weight(mine).double()[classes],
                                           torch.searchsorted(classes, y), scale=20.0, m2=0.3,
                                           gradient="detached")
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-5, atol=1e-5)
    # A sample rate that keeps no negative trains on the positive classes, as insightface.
    for module in (PartialFC_V2(Margin(1.0, 0.5, 0.0), D, C, sample_rate=0.2),
                   PartialFC(Margin(1.0, 0.5, 0.0), D, C, sample_rate=0.2)):
        assert module.num_sample == 0
        load_full_weight(module, w.float()) if isinstance(module, PartialFC) else \
            module.weight.data.copy_(w.float()[module.class_start:module.class_start + module.num_local])
        results.append(module(local(x, rank), local(y, rank).clone()).detach())
    torch.testing.assert_close(results[-1], results[-2], rtol=1e-6, atol=1e-6)
    # Another rank's shard of the same size is refused; the shape alone would let it in.
    torch.save(mine.state_dict(), f"{path}.rank{rank}")
    dist.barrier()
    if rank == 1:
        with pytest.raises(ValueError, match=r"holds classes \[0, 4\) of 11, this rank classes \[4, 8\)"):
            mine.load_state_dict(torch.load(f"{path}.rank0"))
    # Embeddings of another dtype on one rank: the same error on every rank, no abort.
    with pytest.raises(ValueError, match="local_embeddings have different dtypes across ranks"):
        mine(local(x, rank).double() if rank == 0 else local(x, rank), local(y, rank))
    assert mine(local(x, rank), local(y, rank)).isfinite()


def full_weight(head):
    """The whole [num_classes * K, D] weight of a PartialFC, on every rank."""
    full = gather_weight(head)
    if full is None:
        full = torch.empty(head.num_classes * head.sub_centers, head.embedding_size, dtype=head.weight.dtype)
    dist.broadcast(full, 0)
    return full


def test_insightface_train_script_contract(tmp_path):
    run(3, drop_in, str(tmp_path / "shard"), tmp_path=tmp_path)


class Trainer:
    """Our transcription of insightface's train_v2.py training step: a DDP backbone, the
    class-sharded head, SGD with momentum and weight decay over both, a polynomial LR with
    warmup, gradient clipping and gradient accumulation; checkpoints as train_v2 writes
    and resumes them (strict loading)."""

    def __init__(self, head_class, rank, world):
        torch.manual_seed(0)  # the same backbone on every rank, the same head init per rank
        self.backbone = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(12, D).double())
        torch.manual_seed(1 + rank)
        self.head = head_class(Margin(1.0, 0.5, 0.0), D, C, sample_rate=0.5).double()
        self.opt = torch.optim.SGD([{"params": self.backbone.parameters()},
                                    {"params": self.head.parameters()}],
                                   lr=0.1, momentum=0.9, weight_decay=5e-4)
        warmup, total = 2, 12
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: (
            (step + 1) / warmup if step < warmup else (1 - (step - warmup) / (total - warmup)) ** 2))
        self.step = 0

    def train(self, steps, rank, accumulate=2):
        for _ in range(steps):
            self.step += 1
            g = torch.Generator().manual_seed(100 * self.step + rank)
            images = torch.randn(B, 12, generator=g, dtype=torch.float64)
            labels = torch.randint(0, C, (B,), generator=g)
            torch.manual_seed(self.step)  # the sampling's draws
            loss = self.head(self.backbone(images), labels)
            loss.backward()
            if self.step % accumulate == 0:
                torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), 5)
                self.opt.step()
                self.opt.zero_grad()
            self.scheduler.step()

    def checkpoint(self):
        return copy.deepcopy({"global_step": self.step,
                              "state_dict_backbone": self.backbone.module.state_dict(),
                              "state_dict_softmax_fc": self.head.state_dict(),
                              "state_optimizer": self.opt.state_dict(),
                              "state_lr_scheduler": self.scheduler.state_dict()})

    def resume(self, saved):
        self.step = saved["global_step"]
        self.backbone.module.load_state_dict(saved["state_dict_backbone"])
        self.head.load_state_dict(saved["state_dict_softmax_fc"])
        self.opt.load_state_dict(saved["state_optimizer"])
        self.scheduler.load_state_dict(saved["state_lr_scheduler"])

    def parameters(self):
        return [p.detach().clone() for p in (*self.backbone.parameters(), self.head.weight)]


def train_v2(rank, world):
    from arcface_torch.partial_fc_v2 import PartialFC_V2
    runs = {}
    for name, head_class in (("insightface", PartialFC_V2), ("facekernels", PartialFC)):
        trainer = Trainer(head_class, rank, world)
        trainer.train(4, rank)  # a checkpoint at an optimizer step: no accumulated gradient
        saved = trainer.checkpoint()
        trainer.train(4, rank)
        runs[name] = (saved, trainer.parameters())
    for a, b in zip(runs["insightface"][1], runs["facekernels"][1]):
        close(a, b)
    # Each one's checkpoint, resumed by the other, continues to the same parameters.
    for saver, resumer, head_class in (("insightface", "facekernels", PartialFC),
                                       ("facekernels", "insightface", PartialFC_V2)):
        trainer = Trainer(head_class, rank, world)
        trainer.resume(runs[saver][0])
        trainer.train(4, rank)
        for a, b in zip(trainer.parameters(), runs[resumer][1]):
            close(a, b)


def test_insightface_training_step_and_resume_both_ways(tmp_path):
    run(2, train_v2, tmp_path=tmp_path)


def save_checkpoint(rank, world, path):
    x, y, w = global_batch(world=2, seed=2)  # the batch the resumed run will see
    head = PartialFC(Margin(*MARGINS["cosface"]), D, C).double()
    load_full_weight(head, w * 0.5 + 1)  # "trained" weights
    full = gather_weight(head)
    torch.save(head.state_dict(), f"{path}.rank{rank}")  # a shard and its class range
    if rank == 0:
        torch.save(full, path)
    else:
        assert full is None


def resume_checkpoint(rank, world, path):
    x, y, w = global_batch(world=2, seed=2)
    head = PartialFC(Margin(*MARGINS["cosface"]), D, C).double()
    shard = torch.load(f"{path}.rank{rank + 1}")  # another class range: refused
    with pytest.raises(ValueError, match="gather_weight and restore with load_full_weight"):
        head.load_state_dict(shard)
    load_full_weight(head, torch.load(path))
    loss = head(local(x, rank), local(y, rank))
    close(loss, single_process(x, w * 0.5 + 1, y, MARGINS["cosface"], "detached")[0])


def bad_input_on_one_rank(rank, world):
    x, y, w = global_batch(world)
    head = PartialFC(Margin(*MARGINS["arcface"]), D, C).double()
    labels = local(y, rank).clone()
    if rank == world - 1:
        labels[0] = C  # out of range on the last rank only
    with pytest.raises(ValueError, match=r"local_labels must lie in \[0, 11\)|another rank was rejected"):
        head(local(x, rank), labels)
    batch = B if rank else B - 1  # unequal local batch sizes
    with pytest.raises(ValueError, match="local batch sizes differ"):
        head(local(x, rank)[:batch], local(y, rank)[:batch])
    assert head(local(x, rank), local(y, rank)).isfinite()  # still usable: nobody hung
    with pytest.raises(ValueError, match=r"num_classes \(2\) must be at least the world size \(3\)"):
        PartialFC(Margin(*MARGINS["arcface"]), D, 2)
    with pytest.raises(TypeError, match="PartialFC: generator must be a torch.Generator or None, got 5"):
        PartialFC(Margin(*MARGINS["arcface"]), D, C, sample_rate=0.5, generator=5)
    # A head that a class shard cannot represent is refused, never trained as another loss.
    for refused in (facekernels.SoftmaxLoss(C, D), facekernels.L2SoftmaxLoss(C, D),
                    facekernels.SphereFaceLoss(C, D), facekernels.JointIdentificationVerificationLoss(C, D)):
        with pytest.raises(ValueError, match=f"margin_loss {type(refused).__name__} cannot be class-sharded"):
            PartialFC(refused, D, C)
    with pytest.raises(ValueError, match="margin_loss TripletMarginLoss is not a margin head"):
        PartialFC(facekernels.TripletMarginLoss(), D, C)
    with pytest.raises(TypeError, match="margin_loss must be a margin head or a callable"):
        PartialFC(0.5, D, C)
    with pytest.raises(ValueError, match=r"CombinedMarginLoss takes m1 == 1 and m3 == 0 \(ArcFace\) or m3 > 0"):
        PartialFC(Margin(2.0, 0.0, 0.0), D, C)(local(x, rank), local(y, rank))
    with pytest.raises(ValueError, match="gradient='detached' applies to the combined margins"):
        PartialFC(facekernels.CurricularFaceLoss(1, D), D, C, gradient="detached")
    # The last, smaller batch of an epoch is allowed (on every rank alike).
    head(local(x, rank)[:2], local(y, rank)[:2])
    assert head.last_batch_size == 2


def insightface_parity(rank, world):
    """Against our transcription of insightface's PartialFC_V2 (dense logits), with
    insightface's margin objects, fused and (wrapped in a plain function) dense. Embeddings
    lie near their class weights, so no target angle passes pi - m2 (where insightface's
    CombinedMarginLoss has no fallback). With m3 > 0 insightface's CombinedMarginLoss drops
    m2. Interclass filtering zeroes the non-target cosines above the threshold (0.3 here,
    which filters some)."""
    x, y, w = global_batch(world, seed=3)
    x = w[y] + 0.3 * x
    cases = [(1.0, 0.5, 0.0, 0.0), (1.0, 0.0, 0.35, 0.0), (1.0, 0.2, 0.1, 0.0), (1.0, 0.5, 0.0, 0.3)]
    for m1, m2, m3, threshold in cases:
        margin = Margin(m1, m2, m3, threshold)
        for dense in (False, True):
            head = PartialFC((lambda z, t: margin(z, t)) if dense else margin, D, C).double()
            load_full_weight(head, w)
            mine = local(x, rank).clone().requires_grad_()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = head(mine, local(y, rank))
                head(mine, local(y, rank))
            assert [str(c.message) for c in caught] == (
                ["PartialFC: margin_loss function is not fused: it runs on dense [global_batch, "
                 "classes] logits, as in insightface"] if dense else [])
            got = (loss.detach(), *torch.autograd.grad(loss, (mine, head.weight)))
            shard = w[head.class_start:head.class_start + head.num_local].clone().requires_grad_()
            mine = local(x, rank).clone().requires_grad_()
            want = reference.partial_fc_v2_loss(mine, local(y, rank), shard, head.class_start,
                                                s=16.0, m1=m1, m2=0.0 if m3 > 0 else m2, m3=m3,
                                                interclass_filtering_threshold=threshold)
            for a, b in zip(got, (want.detach(), *torch.autograd.grad(want, (mine, shard)))):
                close(a, b)
    # insightface's ArcFace (exact gradient, easy margin or not) and CosFace: fused equals
    # the same object run densely.
    easy = ArcFace(16.0, 0.5)
    easy.easy_margin = True
    for margin in (ArcFace(16.0, 0.5), easy, CosFace(16.0, 0.35)):
        results = []
        for callable_ in (margin, lambda z, t: margin(z, t)):
            head = PartialFC(callable_, D, C).double()
            load_full_weight(head, w)
            mine = local(x, rank).clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = head(mine, local(y, rank))
            results.append((loss.detach(), *torch.autograd.grad(loss, (mine, head.weight))))
        for a, b in zip(*results):
            close(a, b)


def test_insightface_partial_fc_v2_semantics(tmp_path):
    run(2, insightface_parity, tmp_path=tmp_path)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_loss_and_gradients_equal_one_process(world, tmp_path):
    run(world, parity, tmp_path=tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_sampled_classes(world, tmp_path):
    run(world, sampling, tmp_path=tmp_path)


def test_checkpoint_saved_at_three_ranks_resumes_at_two(tmp_path):
    path = tmp_path / "full_weight.pt"
    run(3, save_checkpoint, str(path), tmp_path=tmp_path)
    run(2, resume_checkpoint, str(path), tmp_path=tmp_path)


def test_a_bad_label_on_one_rank_raises_on_every_rank(tmp_path):
    run(3, bad_input_on_one_rank, tmp_path=tmp_path)


def test_clear_errors_without_a_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        PartialFC(Margin(*MARGINS["arcface"]), D, C)


@pytest.mark.parametrize("loss", ["cosface", "combined", "curricularface", "adaface", "magface",
                                  "subcenter", "elasticface"])
def test_trainer_under_torchrun(loss, tmp_path):
    """Two ranks (gloo): DDP backbone, PartialFC head, both impls; rank 0 reports."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "facekernels.train",
               "--distributed", "--loss", loss, "--epochs", "1", "--report", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["world_size"] == 2 and "2 ranks" in done.stdout
    assert result["parity_fp64"]["max_rel_loss_diff"] < 1e-12
    assert result["parity_fp64"]["max_rel_grad_diff"] < 1e-12
    assert result["parity"]["max_rel_loss_diff"] < 1e-5


def test_trainer_distributed_needs_torchrun():
    done = subprocess.run([sys.executable, "-m", "facekernels.train", "--distributed"],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "facekernels-train: error: --distributed: launch with torchrun (WORLD_SIZE and RANK are not set)"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
