"""Center loss on the CPU against the sparse in-place eager update, interleaved.

Forward + backward + center update of the fused op and of what a careful user writes in
eager PyTorch (gather the batch's centers; update only the batch's classes, in place, with
unique + index_add_), the two in turn in each round (see interleave.py), with the median
of the per-round ratios and the middle half of them in brackets.

    python benchmarks/center_loss_table.py --threads 1 2 --rounds 300
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_center_loss import facekernels_step, sparse_eager_step  # noqa: E402
from interleave import interleaved, ratio_text  # noqa: E402

import facekernels  # noqa: E402

SHAPES = ((512, 512, 1_000), (512, 512, 100_000), (120, 128, 29))  # N, D, C


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, torch.get_num_threads()])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    print(f"fwd+bwd+update, {args.rounds} interleaved rounds; torch {torch.__version__}, "
          f"facekernels {facekernels.__version__}", flush=True)
    print(f"{'N':>4} {'D':>4} {'C':>7} {'thr':>3} {'fk ms':>7} {'eager ms':>8} {'eager/fk':>18}",
          flush=True)
    for n, dim, num_classes in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, dim, generator=g).requires_grad_()
        labels = torch.randint(0, num_classes, (n,), generator=g)
        centers = torch.randn(num_classes, dim, generator=g)

        def call(step):
            def run():
                x.grad = None
                step(x, labels, centers)

            return run

        for threads in args.threads:
            torch.set_num_threads(threads)
            t = interleaved({"fk": call(facekernels_step), "eager": call(sparse_eager_step)},
                            args.rounds)
            print(f"{n:>4} {dim:>4} {num_classes:>7} {threads:>3} "
                  f"{statistics.median(t['fk']) * 1e3:>7.3f} {statistics.median(t['eager']) * 1e3:>8.3f} "
                  f"{ratio_text(t['eager'], t['fk']):>18}", flush=True)


if __name__ == "__main__":
    main()
