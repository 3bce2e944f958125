"""The margin heads on the CPU against the floor, eager and torch.compile, interleaved.

Forward + backward (gradients for embeddings and weight) of ArcFace and of every adaptive
head, against the 3 bare GEMMs of any fwd+bwd (logits, dX = dZ W, dW = dZ^T X), the
eager reference twin and its torch.compile. The four run in turn in each round (the order
rotating), so a busy machine slows them alike; the table gives medians and, for each
ratio, its median and the middle half of the rounds. compile/floor bounds what any step
running the same three GEMMs can gain over torch.compile: fk/floor is at least about 1.

    python benchmarks/margin_heads_table.py --threads 1 2 --classes 1000 20000 100000
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_adaptive_heads import HEADS, _raw_embeddings  # noqa: E402
from bench_margin_softmax import bare_gemms, facekernels_loss, reference_loss  # noqa: E402
from interleave import interleaved, ratio_text  # noqa: E402

import facekernels  # noqa: E402


def arcface_steps(x, y, num_classes, dim, g):
    w = (torch.randn(num_classes, dim, generator=g) * 0.01).requires_grad_()
    compiled = torch.compile(reference_loss)
    return w, {"facekernels": lambda: facekernels_loss(x, w, y), "reference": lambda: reference_loss(x, w, y),
               "compiled": lambda: compiled(x, w, y)}


def head_steps(name, x, y, num_classes, dim):
    factory, oracle = HEADS[name]
    module = factory(num_classes, dim)
    compiled = torch.compile(oracle)
    return module.weight, {"facekernels": lambda: module(x, y),
                           "reference": lambda: oracle(x, module.weight, y, module),
                           "compiled": lambda: compiled(x, module.weight, y, module)}


def rounds_of(steps, x, w, rounds):
    """{impl: [seconds per round]}: the floor and each impl's fwd+bwd, interleaved."""

    def fwd_bwd(loss_fn):
        def step():
            x.grad = w.grad = None
            loss_fn().mean().backward()

        return step

    xs, ws = x.detach(), w.detach()
    return interleaved({"floor": lambda: bare_gemms(xs, ws, None),
                        **{k: fwd_bwd(v) for k, v in steps.items()}}, rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=["arcface", *HEADS])
    parser.add_argument("--classes", nargs="+", type=int, default=[1000, 20_000, 100_000])
    parser.add_argument("--dim", nargs="+", type=int, default=[128])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, torch.get_num_threads()])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"N={args.batch}, fwd+bwd, {args.rounds} interleaved rounds; torch {torch.__version__}, "
          f"facekernels {facekernels.__version__}", flush=True)
    print(f"{'head':<14} {'D':>4} {'C':>8} {'thr':>3} {'floor ms':>9} {'fk ms':>8} {'fk/floor':>18} "
          f"{'eager/fk':>18} {'compile/fk':>18} {'compile/floor':>18}", flush=True)
    for head in args.heads:
        for dim in args.dim:
            for num_classes in args.classes:
                g = torch.Generator().manual_seed(0)
                x = _raw_embeddings(args.batch, dim, g).requires_grad_()
                y = torch.randint(0, num_classes, (args.batch,), generator=g)
                w, steps = (arcface_steps(x, y, num_classes, dim, g) if head == "arcface"
                            else head_steps(head, x, y, num_classes, dim))
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    t = rounds_of(steps, x, w, args.rounds)
                    fk = t["facekernels"]
                    print(f"{head:<14} {dim:>4} {num_classes:>8} {threads:>3} "
                          f"{statistics.median(t['floor']) * 1e3:>9.1f} {statistics.median(fk) * 1e3:>8.1f} "
                          f"{ratio_text(fk, t['floor']):>18} {ratio_text(t['reference'], fk):>18} "
                          f"{ratio_text(t['compiled'], fk):>18} {ratio_text(t['compiled'], t['floor']):>18}", flush=True)
                torch._dynamo.reset()


if __name__ == "__main__":
    main()
