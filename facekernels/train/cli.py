"""facekernels-train: train a compact face CNN with the reference losses and with
facekernels, side by side, and report parity, speed and face-verification accuracy."""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import sys

import torch
import torch.distributed as dist

from facekernels.train import baselines, loss_speed
from facekernels.train.data import fold_splits, image_folder, open_set_split, synthetic_faces
from facekernels.train.loop import Config, initial_state, train, verification_pairs
from facekernels.train.objectives import DISTRIBUTED, IMPLS, LOSSES, MINING, training_defaults


# The losses whose fused op is measured at a face model's scale after training.
SCALE_LOSSES = ("arcface", "cosface", "combined")


class Parser(argparse.ArgumentParser):
    """Errors are one line on stderr and exit status 2, without argparse's usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, accept, expected):
    """An argparse type: `kind(text)` where `accept` holds (NaN and inf fail every test
    used here, so they are refused too)."""
    def parse(text):
        try:
            value = kind(text)
            ok = accept(value)
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def _check_output(p, option, path):
    """An output must be writable now, not only after minutes of training. An existing
    file is checked itself (so /dev/stdout works), a new one by its folder."""
    if not os.path.basename(path):
        p.error(f"{option} {path!r}: names no file")
    if os.path.isdir(path):
        p.error(f"{option} {path}: is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    exists = os.path.exists(path)
    if not exists and not os.path.isdir(folder):
        p.error(f"{option} {path}: no such directory {folder}")
    if not (os.access(path, os.W_OK) if exists else os.access(folder, os.W_OK | os.X_OK)):
        p.error(f"{option} {path}: permission denied")


def _check_plot(p, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as error:
        p.error(f"--plot needs matplotlib (pip install matplotlib): {error}")
    suffix = os.path.splitext(path)[1][1:].lower()
    formats = Figure().canvas.get_supported_filetypes()
    if suffix and suffix not in formats:
        p.error(f"--plot {path}: matplotlib cannot write .{suffix} files, only {', '.join(sorted(formats))}")


def _launch_environment(p):
    """torchrun's variables, checked before any process group waits on them: the world
    size, or exit 2 and one line (a rank outside the world would wait for peers forever)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        p.error("--distributed: launch with torchrun (WORLD_SIZE and RANK are not set)")
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = os.environ.get(name, "0")
        if not text.isdigit():
            p.error(f"--distributed: {name} must be a non-negative integer, got {text!r}")
        values[name] = int(text)
    if values["WORLD_SIZE"] < 1:
        p.error(f"--distributed: WORLD_SIZE must be at least 1, got {values['WORLD_SIZE']}")
    if values["RANK"] >= values["WORLD_SIZE"]:
        p.error(f"--distributed: RANK must lie in [0, WORLD_SIZE = {values['WORLD_SIZE']}), got {values['RANK']}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            p.error(f"--distributed: {name} is not set (torchrun sets it)")
    if not os.environ["MASTER_PORT"].isdigit() or not 0 < int(os.environ["MASTER_PORT"]) < 65536:
        p.error(f"--distributed: MASTER_PORT must be a port number, got {os.environ['MASTER_PORT']!r}")
    return values["WORLD_SIZE"]


def parse_args(argv):
    defaults = Config()
    p = Parser(prog="facekernels-train", description=__doc__)
    positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
    p.add_argument("--loss", choices=LOSSES, default=defaults.loss)
    p.add_argument("--mining", choices=MINING, help=f"triplet mining, with --loss triplet only "
                                                    f"(default: {defaults.mining})")
    p.add_argument("--impl", choices=IMPLS + ("both",), default="both")
    p.add_argument("--data", metavar="DIR",
                   help="an ImageFolder tree, one folder per person, two photos or more for each "
                        "held-out person (default: built-in synthetic faces)")
    p.add_argument("--holdout", type=_number(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
                   help="fraction of people held out for verification, with --folds 1 (default: 0.25)")
    p.add_argument("--folds", type=positive_int, default=1,
                   help="split the people into K disjoint held-out groups and train from scratch once "
                        "per group, on everyone else; report the mean and std over the K folds "
                        "(default: 1, one split by --holdout)")
    p.add_argument("--embedding-size", type=positive_int, default=defaults.embedding_size)
    p.add_argument("--epochs", type=positive_int, help="default: per loss, see objectives.TRAINING_DEFAULTS")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="photos per batch: 4 photos per person (8 for triplet and contrastive)")
    p.add_argument("--lr", type=_number(float, lambda v: 0 < v < math.inf, "a finite number > 0"),
                   help="AdamW's peak learning rate; default: per loss")
    p.add_argument("--weight-decay", type=_number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
                   default=defaults.weight_decay, help="AdamW's weight decay")
    p.add_argument("--seed", type=_number(int, lambda v: -2**63 <= v < 2**64, "an integer in [-2^63, 2^64)"),
                   default=defaults.seed)  # the range torch.manual_seed takes
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--amp", choices=("none", "bf16"), default="none")
    p.add_argument("--distributed", action="store_true",
                   help="under torchrun: the backbone in DDP, a class-sharded PartialFC head "
                        f"({', '.join(DISTRIBUTED)}), each rank a share of every batch; rank 0 reports")
    p.add_argument("--no-scale-benchmark", dest="scale_benchmark", action="store_false",
                   help="skip the closing measurement of the loss alone at a face model's class count "
                        f"(with --loss {', '.join(SCALE_LOSSES)}; a few seconds)")
    p.add_argument("--report", metavar="FILE.json")
    p.add_argument("--plot", metavar="FILE.png")
    args = p.parse_args(argv)
    if args.mining is not None and args.loss != "triplet":
        p.error(f"--mining applies to --loss triplet only, got --loss {args.loss}")
    args.mining = args.mining or defaults.mining
    args.scale_benchmark = args.scale_benchmark and args.loss in SCALE_LOSSES and not args.distributed
    if args.holdout is not None and args.folds > 1:
        p.error(f"--holdout applies to --folds 1 only: --folds {args.folds} holds out each person once")
    args.holdout = 0.25 if args.holdout is None else args.holdout
    tuned = training_defaults(args.loss)
    args.epochs = tuned["epochs"] if args.epochs is None else args.epochs
    args.lr = tuned["lr"] if args.lr is None else args.lr
    args.per_person = tuned["per_person"]
    if args.batch_size < 2 * args.per_person or args.batch_size % args.per_person:
        p.error(f"--batch-size must be a multiple of {args.per_person}, at least {2 * args.per_person}, "
                f"got {args.batch_size}")
    if args.distributed:
        world = _launch_environment(p)
        if args.loss not in DISTRIBUTED:
            p.error(f"--distributed trains --loss {', '.join(DISTRIBUTED)}, got --loss {args.loss}")
        if args.batch_size % (world * args.per_person):
            p.error(f"--distributed: --batch-size must be a multiple of {world * args.per_person} "
                    f"(world size {world} x {args.per_person} photos per person), got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    for option, path in (("--report", args.report), ("--plot", args.plot)):
        if path is not None:
            _check_output(p, option, path)
    if args.plot is not None:
        _check_plot(p, args.plot)
        if args.report is not None and os.path.abspath(args.plot) == os.path.abspath(args.report):
            p.error(f"--plot and --report name the same file, {args.plot}")
    return p, args


def _table(rows):
    """Rows of strings as aligned columns, a rule under the first."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(report):
    rows = [("impl", "verif. acc", "TAR@FAR=1e-1", "EER", "AUC", "step ms", "loss ms", "peak MB")]
    for name, run in report["impls"].items():
        v = run["verification"]
        rows.append((name, f"{v['accuracy']:.3f} +- {v['accuracy_std']:.3f}",
                     f"{v['tar_at_far'].get('1e-1', float('nan')):.3f}", f"{v['eer']:.3f}",
                     f"{v['roc_auc']:.3f}", f"{run['step_ms']:.1f}", f"{run['loss_ms']:.2f}",
                     f"{run['peak_mem_mb']:.0f}"))
    for name, v in report["baselines"].items():
        rows.append((f"baseline: {name}", f"{v['accuracy']:.3f} +- {v['accuracy_std']:.3f}",
                     f"{v['tar_at_far'].get('1e-1', float('nan')):.3f}", f"{v['eer']:.3f}",
                     f"{v['roc_auc']:.3f}", "", "", ""))
    return _table(rows)


def folds_table(summary):
    """Mean +- std over the folds, then each fold's accuracy."""
    any_entry = next(iter(summary["baselines"].values()))
    folds = len(any_entry["accuracies"])
    rows = [("impl", "verif. acc, mean +- std over folds", *(f"fold {k + 1}" for k in range(folds)),
             "EER", "AUC", "step ms", "loss ms")]
    for group, prefix in (("impls", ""), ("baselines", "baseline: ")):
        for name, entry in summary[group].items():
            rows.append((prefix + name, f"{entry['accuracy_mean']:.3f} +- {entry['accuracy_std']:.3f}",
                         *(f"{a:.3f}" for a in entry["accuracies"]), f"{entry['eer_mean']:.3f}",
                         f"{entry['roc_auc_mean']:.3f}",
                         f"{entry['step_ms']:.1f}" if "step_ms" in entry else "",
                         f"{entry['loss_ms']:.2f}" if "loss_ms" in entry else ""))
    return _table(rows)


def _mean(values):
    return sum(values) / len(values)


def fold_summary(folds):
    """Per impl and baseline over the folds' reports: the mean and the standard deviation
    (population, as the 10-fold protocol's) of the verification accuracy, each fold's
    accuracy, the mean EER and AUC; per impl also the mean step and loss times."""
    def over_folds(verifications):
        accuracy = torch.tensor([v["accuracy"] for v in verifications], dtype=torch.float64)
        return {"accuracy_mean": float(accuracy.mean()), "accuracy_std": float(accuracy.std(correction=0)),
                "accuracies": accuracy.tolist(), "eer_mean": _mean([v["eer"] for v in verifications]),
                "roc_auc_mean": _mean([v["roc_auc"] for v in verifications])}

    impls = {name: {**over_folds([f["impls"][name]["verification"] for f in folds]),
                    "step_ms": _mean([f["impls"][name]["step_ms"] for f in folds]),
                    "loss_ms": _mean([f["impls"][name]["loss_ms"] for f in folds])}
             for name in folds[0]["impls"]}
    baselines = {name: over_folds([f["baselines"][name] for f in folds]) for name in folds[0]["baselines"]}
    return {"impls": impls, "baselines": baselines}


def plot(loss, runs, path):
    """Loss curves and ROC of each run in `runs` ({label: RunResult})."""
    import matplotlib.pyplot as plt  # present: parse_args checked

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in runs.items():
        left.plot(run.losses, label=name, alpha=0.8)
        right.plot(*run.roc, label=f"{name} (AUC {run.verification['roc_auc']:.3f})")
    left.set(title=f"training loss ({loss})", xlabel="step", ylabel="loss")
    right.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    right.set(title="ROC, held-out people", xlabel="false accept rate", ylabel="true accept rate")
    left.legend(fontsize="small" if len(runs) > 2 else None)
    right.legend(loc="lower right", fontsize="small" if len(runs) > 2 else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    """The console script: sys.exit(main()) must see None, or it prints the value and
    exits with status 1."""
    run(sys.argv[1:] if argv is None else argv)


def run(argv):
    """Trains and evaluates as the command line `argv` asks, prints the summary and
    returns the report. Every input is checked before the first training step: a bad one
    exits with status 2 and one line on stderr."""
    parser, args = parse_args(argv)
    if args.distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # Every rank trains; rank 0 alone speaks and writes.
    quiet = args.distributed and dist.get_rank() != 0
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            return _run(parser, args, write=not quiet)
    finally:
        if args.distributed:
            dist.destroy_process_group()


def _splits(args, faces):
    """[(training set, held-out set, verification pairs)], one per fold; ValueError when
    a fold cannot be scored."""
    if args.folds == 1:
        train_set, held_out = open_set_split(faces, args.holdout, args.seed)
        return [(train_set, held_out, verification_pairs(held_out, args.seed))]
    splits = []
    for k, (train_set, held_out) in enumerate(fold_splits(faces, args.folds, args.seed)):
        try:
            splits.append((train_set, held_out, verification_pairs(held_out, args.seed, "--folds")))
        except ValueError as error:
            raise ValueError(f"fold {k + 1} of {args.folds}: {error}") from error
    return splits


def train_fold(config, impls, train_set, held_out, pairs, fold=""):
    """Every impl from one initial state, and the baselines, on one split of the people:
    (the runs by impl, this split's report). `fold` ("2/4") labels the progress bars."""
    state = initial_state(config, train_set.num_people)
    runs = {impl: train(config, train_set, held_out, impl, state, parity=impl == "facekernels", fold=fold)
            for impl in impls}
    report = {
        "impls": {impl: run.to_json() for impl, run in runs.items()},
        "baselines": {"raw_pixels": baselines.raw_pixels(held_out, pairs),
                      "eigenfaces": baselines.eigenfaces(train_set, held_out, pairs)},
    }
    if "facekernels" in runs:
        report["parity"] = dataclasses.asdict(runs["facekernels"].parity)
        report["parity_fp64"] = dataclasses.asdict(runs["facekernels"].parity_fp64)
        report["loss_interleaved"] = runs["facekernels"].interleaved_loss_speed()
        report["loss_speedup"] = report["loss_interleaved"]["speedup"]
    if len(runs) == 2:  # the runs follow each other: the load of the moment weighs in
        report["speedup"] = runs["reference"].step_ms / runs["facekernels"].step_ms
    return runs, report


def _across_folds(folds):
    """The report's summary of K folds: mean and std per impl and baseline, the parity
    maxima over every fold, the speed-ups of the mean times."""
    report = {"summary": fold_summary(folds)}
    for key in ("parity", "parity_fp64"):
        if key in folds[0]:
            report[key] = {field: max(f[key][field] for f in folds) for field in folds[0][key]}
    impls = report["summary"]["impls"]
    if len(impls) == 2:
        report["speedup"] = impls["reference"]["step_ms"] / impls["facekernels"]["step_ms"]
    if "loss_speedup" in folds[0]:
        report["loss_speedup"] = statistics.median(f["loss_speedup"] for f in folds)
    return report


def _run(parser, args, write):
    try:
        faces = image_folder(args.data) if args.data is not None else synthetic_faces(seed=args.seed)
        splits = _splits(args, faces)
    except ValueError as error:
        parser.error(str(error))
    config = Config(loss=args.loss, mining=args.mining, embedding_size=args.embedding_size,
                    epochs=args.epochs, people_per_batch=args.batch_size // args.per_person,
                    per_person=args.per_person, lr=args.lr, weight_decay=args.weight_decay,
                    seed=args.seed, device=args.device, amp=args.amp, distributed=args.distributed)
    config.people_per_batch = min(config.people_per_batch, *(train_set.num_people for train_set, _, _ in splits))
    source = "built-in synthetic faces" if args.data is None else args.data

    def people(sets):
        sizes = sorted({s.num_people for s in sets})
        return f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"

    ranks = f"; {dist.get_world_size()} ranks" if args.distributed else ""
    if args.folds == 1:
        print(f"data: {source}: {faces.num_people} people, {len(faces.labels)} photos; training on "
              f"{splits[0][0].num_people} people, verifying on {splits[0][1].num_people} held-out people{ranks}")
    else:
        print(f"data: {source}: {faces.num_people} people, {len(faces.labels)} photos; {args.folds} folds: "
              f"{people(s[1] for s in splits)} held-out people each, training from scratch on the other "
              f"{people(s[0] for s in splits)}{ranks}")

    impls = IMPLS if args.impl == "both" else (args.impl,)
    runs, folds = {}, []
    for k, (train_set, held_out, pairs) in enumerate(splits):
        if args.folds > 1:
            print(f"\nfold {k + 1}/{args.folds}: held out {', '.join(held_out.names)}")
        fold_runs, fold = train_fold(config, impls, train_set, held_out, pairs,
                                     f"{k + 1}/{args.folds}" if args.folds > 1 else "")
        if args.folds > 1:
            print(summary_table(fold))
            fold = {"held_out": held_out.names, **fold}
        runs.update({(f"fold {k + 1} {impl}" if args.folds > 1 else impl): run for impl, run in fold_runs.items()})
        folds.append(fold)
    report = {
        "loss": args.loss if args.loss != "triplet" else f"triplet ({args.mining})",
        "data": source,
        "config": dataclasses.asdict(config),
        "world_size": dist.get_world_size() if args.distributed else 1,
    }
    if args.folds == 1:
        report.update(folds[0])
    else:
        report.update(folds=folds, **_across_folds(folds))

    print()
    if args.folds == 1:
        print(summary_table(report))
    else:
        print(f"over the {args.folds} folds (each fold's accuracy by the 10-fold protocol on its "
              f"held-out people):")
        print(folds_table(report["summary"]))
    over = "max over the run" if args.folds == 1 else f"max over the {args.folds} folds"
    if "parity" in report:
        print(f"\nparity, every step, same batch and parameters ({over}):")
        for key, label in (("parity", "training call vs reference, fp32"),
                           ("parity_fp64", "same formulas in float64")):
            p = report[key]
            print(f"  {label:<34} |loss diff| {p['max_abs_loss_diff']:.2e}  relative loss diff "
                  f"{p['max_rel_loss_diff']:.2e}  relative gradient diff {p['max_rel_grad_diff']:.2e}")
    if "loss_interleaved" in report:
        speed = report["loss_interleaved"]
        noise = "; the noise exceeds the difference" if speed["noise_exceeds_difference"] else ""
        print(f"loss forward + backward, both on each of {speed['steps']} steps (interleaved): reference "
              f"{speed['reference_ms']:.2f} ms, facekernels {speed['facekernels_ms']:.2f} ms (medians); "
              f"speed-up {speed['speedup']:.2f}x (middle half of the steps {speed['speedup_q1']:.2f}-"
              f"{speed['speedup_q3']:.2f}x{noise})")
    if "speedup" in report:
        print(f"whole training step: {report['speedup']:.2f}x (the two runs follow each other, so the "
              f"machine's load of the moment weighs in)")
    if args.scale_benchmark:
        report["loss_at_scale"] = loss_speed.measure(args.loss, args.device)
        print("\n" + loss_speed.describe(report["loss_at_scale"]))
    if not write:
        return report
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report: {args.report}")
    if args.plot:
        plot(report["loss"], runs, args.plot)
        print(f"plot: {args.plot}")
    return report
