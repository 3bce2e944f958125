"""One training run, and the per-step parity check of the fused losses against the
reference formulas on the very same batch and parameters."""

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from facekernels.eval import make_pairs, pair_scores, roc_curve, verification_report
from facekernels.train.data import augment, center_crop, identity_batches
from facekernels.train.memory import peak_bytes, reset_peak
from facekernels.train.model import EmbeddingNet
from facekernels.train.objectives import Objective

FOLDS = 10  # verification accuracy by the LFW protocol's 10-fold cross-validation


@dataclass
class Config:
    loss: str = "arcface"
    mining: str = "all"
    embedding_size: int = 128
    epochs: int = 60
    people_per_batch: int = 16
    per_person: int = 4
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    distributed: bool = False  # under torchrun: DDP backbone, PartialFC head, batches split


@dataclass
class Parity:
    """Largest differences between the fused and the reference loss over a run."""

    max_abs_loss_diff: float = 0.0
    max_rel_loss_diff: float = 0.0
    max_rel_grad_diff: float = 0.0

    def update(self, fused_loss, reference_loss, fused_grads, reference_grads):
        diff = abs(float(fused_loss) - float(reference_loss))
        self.max_abs_loss_diff = max(self.max_abs_loss_diff, diff)
        self.max_rel_loss_diff = max(self.max_rel_loss_diff, diff / max(abs(float(reference_loss)), 1e-12))
        for got, want in zip(fused_grads, reference_grads):
            # Normwise: the largest element error relative to the largest element.
            scale = max(float(want.abs().max()), 1e-12)
            self.max_rel_grad_diff = max(self.max_rel_grad_diff, float((got - want).abs().max()) / scale)


@dataclass
class RunResult:
    losses: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)  # training accuracy per step, if a classifier
    step_ms: float = 0.0
    loss_ms: float = 0.0
    peak_mem_mb: float = 0.0
    verification: dict = field(default_factory=dict)
    roc: tuple = ()
    parity: Parity = None  # the training call against the reference, both in fp32
    parity_fp64: Parity = None  # the same formulas in float64: free of rounding flips
    # With parity: each step's fused loss forward + backward and, right before it on the
    # same batch, the reference's: timings interleaved step by step.
    loss_step_ms: list = field(default_factory=list)
    reference_loss_step_ms: list = field(default_factory=list)

    def interleaved_loss_speed(self):
        """Medians of the per-step loss times and the quartiles of the per-step ratios
        reference / fused; the noise exceeds the difference when 1 lies between them."""
        ratios = [r / f for r, f in zip(self.reference_loss_step_ms, self.loss_step_ms)]
        q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        return {"steps": len(ratios), "reference_ms": statistics.median(self.reference_loss_step_ms),
                "facekernels_ms": statistics.median(self.loss_step_ms), "speedup": median,
                "speedup_q1": q1, "speedup_q3": q3, "noise_exceeds_difference": q1 <= 1.0 <= q3}

    def to_json(self):
        return {
            "losses": self.losses,
            "train_accuracy": self.accuracy,
            "step_ms": self.step_ms,
            "loss_ms": self.loss_ms,
            "peak_mem_mb": self.peak_mem_mb,
            "verification": self.verification,
        }


def synchronize(device):
    """Waits for the device's queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def initial_state(config, num_classes):
    """Model and loss parameters both runs start from."""
    torch.manual_seed(config.seed)
    model = EmbeddingNet(config.embedding_size)
    objective = Objective(config.loss, num_classes, config.embedding_size, config.mining,
                          config.distributed)
    return model.state_dict(), objective.state_dict()


def _loss_and_grads(loss_fn, objective, embeddings, labels, dtype):
    """loss_fn(e, labels, stand-ins) on copies of this step's embeddings and of the loss's
    parameters in `dtype`, with its gradients; the originals are left alone."""
    stand_ins = {name: t.detach().to(dtype, copy=True).requires_grad_(t.requires_grad)
                 for name, t in objective.tensors().items()}
    e = embeddings.detach().to(dtype, copy=True).requires_grad_()
    loss = loss_fn(e, labels, stand_ins)
    inputs = [e] + [t for t in stand_ins.values() if t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    names = [name for name, t in stand_ins.items() if t.requires_grad]
    return loss.detach(), grads, names


def _check_parity(objective, embeddings, labels, parity_fp64):
    """Before the fused training call (which may move state such as centers): the
    reference loss and gradients in fp32 on this step's batch and parameters, to compare
    with that call, and the seconds they took; and both formulas in float64, compared
    right away."""
    synchronize(embeddings.device)
    start = time.perf_counter()
    expected = _loss_and_grads(objective.reference_loss, objective, embeddings, labels, torch.float32)
    synchronize(embeddings.device)
    seconds = time.perf_counter() - start
    fused64, grads64, _ = _loss_and_grads(objective.fused_loss, objective, embeddings, labels, torch.float64)
    reference64, reference_grads64, _ = _loss_and_grads(
        objective.reference_loss, objective, embeddings, labels, torch.float64)
    parity_fp64.update(fused64, reference64, grads64, reference_grads64)
    return expected, seconds


def train(config, train_set, held_out, impl, state, parity=False, fold=""):
    """Trains from `state` with `impl` ("reference" or "facekernels") and evaluates
    verification on the held-out people. With parity, every step also runs the reference
    formulas on the same batch (excluded from the timings). `fold` ("2/4") labels the
    progress bar."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = EmbeddingNet(config.embedding_size).to(device)
    objective = Objective(config.loss, train_set.num_people, config.embedding_size, config.mining,
                          config.distributed).to(device)
    model.load_state_dict(state[0])
    objective.load_state_dict(state[1])
    rank, world = (dist.get_rank(), dist.get_world_size()) if config.distributed else (0, 1)
    if config.distributed:  # the backbone's gradients are averaged over ranks
        model = nn.parallel.DistributedDataParallel(model)
    params = list(model.parameters()) + list(objective.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = sum(1 for _ in identity_batches(
        train_set.labels, config.people_per_batch, config.per_person, torch.Generator()))
    total = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total, pct_start=0.15)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels = train_set.images, train_set.labels

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16")

    result = RunResult(parity=Parity() if parity else None,
                       parity_fp64=Parity() if parity else None)
    step_seconds = 0.0
    reset_peak(device)
    desc = f"{config.loss} [{impl}]" + (f" fold {fold}" if fold else "")
    bar = tqdm(total=total, desc=desc, disable=None if rank == 0 else True)
    model.train()
    objective.train()
    for _ in range(config.epochs):
        for batch in identity_batches(labels, config.people_per_batch, config.per_person, generator):
            x = augment(images[batch], generator)[rank::world].to(device)  # this rank's share
            batch = batch[rank::world]
            y = labels[batch].to(device)
            synchronize(device)
            start = time.perf_counter()
            with autocast():
                embeddings = model(x)
            e = embeddings.detach().float().requires_grad_()
            if parity:
                synchronize(device)
                paused = time.perf_counter()
                (expected, expected_grads, names), seconds = _check_parity(objective, e, y, result.parity_fp64)
                result.reference_loss_step_ms.append(1e3 * seconds)
                synchronize(device)
                start += time.perf_counter() - paused
            synchronize(device)
            loss_start = time.perf_counter()
            with autocast():
                loss, predicted = objective(e, y, impl)
            loss.backward()
            synchronize(device)
            result.loss_step_ms.append(1e3 * (time.perf_counter() - loss_start))
            if parity:
                by_name = dict(objective.tensors())
                result.parity.update(loss.detach(), expected, [e.grad] + [by_name[n].grad for n in names],
                                     expected_grads)
            embeddings.backward(e.grad.to(embeddings.dtype))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            synchronize(device)
            step_seconds += time.perf_counter() - start
            result.losses.append(float(loss.detach()))
            if predicted is not None:
                result.accuracy.append(float((predicted == y).float().mean()))
            postfix = {"loss": f"{result.losses[-1]:.3f}"}
            if result.accuracy:
                postfix["acc"] = f"{result.accuracy[-1]:.2f}"
            bar.set_postfix(postfix)
            bar.update()
    bar.close()
    result.peak_mem_mb = peak_bytes(device) / 2**20
    result.step_ms = 1e3 * step_seconds / total
    result.loss_ms = statistics.fmean(result.loss_step_ms)
    backbone = model.module if config.distributed else model
    result.verification, result.roc = evaluate(backbone, held_out, device, config.seed)
    return result


@torch.no_grad()
def embed(model, images, device, batch=256):
    """The embedding of each center crop plus that of its mirror image (flip test-time
    augmentation, as insightface's verification does: the training crops are flipped at
    random too). Summed, not normalized: the norm stays the model's."""
    model.eval()
    chunks = []
    for i in range(0, len(images), batch):
        crops = center_crop(images[i:i + batch]).to(device)
        chunks.append((model(crops) + model(crops.flip(3))).float().cpu())
    return torch.cat(chunks)


def verification_pairs(held_out, seed, split="--holdout"):
    """The held-out people's verification pairs, the same for every run and baseline.

    Raises ValueError when they cannot be scored: a held-out person with a single photo
    (no positive pair), or fewer pairs than FOLDS. `split` names the option that held
    these people out (--holdout or --folds), for the message."""
    photos = torch.bincount(held_out.labels, minlength=held_out.num_people).tolist()
    single = [name for name, count in zip(held_out.names, photos) if count < 2]
    if single:
        raise ValueError(f"every held-out person needs two photos or more for verification pairs; "
                         f"{len(single)} of {held_out.num_people} have a single photo: {', '.join(single[:5])}"
                         f"{', ...' if len(single) > 5 else ''} (people are held out at random by "
                         f"{split} and --seed)")
    pairs = make_pairs(held_out.labels, generator=torch.Generator().manual_seed(seed))
    if len(pairs[2]) < FOLDS:
        raise ValueError(f"the {held_out.num_people} held-out people give {len(pairs[2])} verification "
                         f"pairs, fewer than the {FOLDS} folds of the protocol: add people or photos, "
                         f"or {'raise --holdout' if split == '--holdout' else 'lower --folds'}")
    return pairs


def evaluate(model, held_out, device, seed):
    """10-fold verification on pairs of held-out people, and the ROC curve."""
    i, j, same = verification_pairs(held_out, seed)
    scores = pair_scores(embed(model, held_out.images, device), i, j)
    fpr, tpr, _ = roc_curve(scores, same)
    return verification_report(scores, same, FOLDS), (fpr.tolist(), tpr.tolist())
