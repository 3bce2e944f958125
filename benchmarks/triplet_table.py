"""The triplet loss on the CPU against its floor, eager, torch.compile and
pytorch-metric-learning, interleaved.

Forward + backward of the triplet margin loss over a batch of 16 photos per identity
(euclidean distances of normalized embeddings). The floor is the 3 GEMMs that any such
step runs: the Gram matrix X X^T, and the backward's two products of an N x N gradient
with X. Everything above it is the distance epilogue, the mining and the loss. The N^3
alternatives (the eager reference twin, its torch.compile, PML's TripletMarginMiner +
TripletMarginLoss) run in turn with ours in each round (see interleave.py).

    python benchmarks/triplet_table.py --threads 1 2 --batch 128 256 512
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_triplet import MARGIN, batch, loss_step, pml_losses  # noqa: E402
from interleave import interleaved, ratio_text  # noqa: E402

import facekernels  # noqa: E402


PML_TYPES = ("all", "hard", "semihard", "easy")


def floor_step(x):
    xs = x.detach()
    h = torch.rand(len(xs), len(xs))

    def step():
        xs @ xs.t()
        h @ xs
        h.t() @ xs

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mining", nargs="+", default=["all", "semihard", "batch_hard"])
    parser.add_argument("--batch", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, torch.get_num_threads()])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    others = ["reference", "reference_compiled"] + (["pml"] if pml_losses is not None else [])
    print(f"D={args.dim}, margin {MARGIN}, fwd+bwd, {args.rounds} interleaved rounds; torch "
          f"{torch.__version__}, facekernels {facekernels.__version__}", flush=True)
    print(f"{'mining':<11} {'N':>5} {'thr':>3} {'floor ms':>9} {'fk ms':>7} {'fk/floor':>18} "
          + " ".join(f"{name + '/fk':>22}" for name in others), flush=True)
    for mining in args.mining:
        for n in args.batch:
            x, labels = batch(n, args.dim, torch.device("cpu"))
            calls = {"floor": floor_step(x)}
            # PML's TripletMarginMiner has no batch-hard or FaceNet type.
            compared = [name for name in others if name != "pml" or mining in PML_TYPES]
            for impl in ["facekernels", *compared]:
                loss_fn = loss_step(impl, mining)

                def step(loss_fn=loss_fn):
                    x.grad = None
                    loss_fn(x, labels).backward()

                calls[impl] = step
            for threads in args.threads:
                torch.set_num_threads(threads)
                t = interleaved(calls, args.rounds)
                fk = t["facekernels"]
                print(f"{mining:<11} {n:>5} {threads:>3} {statistics.median(t['floor']) * 1e3:>9.2f} "
                      f"{statistics.median(fk) * 1e3:>7.2f} {ratio_text(fk, t['floor']):>18} "
                      + " ".join(f"{ratio_text(t[name], fk) if name in t else 'n/a':>22}"
                                 for name in others), flush=True)
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
