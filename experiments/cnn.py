"""Train and evaluate the homework's CNNs on Intel scenes.

    python -m experiments.cnn --lr 0.01                      # one baseline model, 40 epochs of SGD
    python -m experiments.cnn --lr 0.1 0.01 0.001            # the sweep, selected by validation accuracy
    python -m experiments.cnn --batch-norm --lr 0.01         # the BN + global-average-pooling variant
    python -m experiments.cnn --lr 0.1 0.01 0.001 --vmap-sweep   # the sweep as one vmapped program
    python -m experiments.cnn --evaluate runs/cnn --data FILE.npz

Writes to --out: metrics.json, training_loss.png, val_accuracy.png, confusion_matrix.png and, per
learning rate, lr_<lr>/ckpt (orbax, every epoch) and lr_<lr>/best (best validation accuracy).
Rerunning an interrupted command resumes from the last epoch checkpoint and ends with the same
metrics as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cnn.data import CLASS_NAMES, DataError, find_duplicates, load
from cnn.model import count_params
import jax

from cnn.train import BatchNormBatchError, SweepTrainer, Trainer, check_batch_norm_batch, confusion_matrix
from common.parallel import is_main_process
from experiments._checkpoint import BestCheckpoint, Checkpoints, is_checkpoint_dir
from experiments._parallel import add_parallel_options, check_same_run, run_devices, start_parallel
from experiments._training import Run, fingerprint, fit, metrics, progress_bar, read_metrics, select, write_metrics
from experiments.configs import CNNConfig, resolved
from experiments._cnn_plots import plot_confusion, plot_curves
from experiments._xla import choose_impl, cnn_retains_memory, tune_cpu
from experiments._cli import warn, ArgumentParser, UserError, folder, add_run_options, logger, strict_json, positive_float, positive_int, resumable_from, run


DEFAULTS = CNNConfig()


def run_dir(out: Path, lr: float) -> Path:
    return out / f"lr_{lr:g}"


def data_fingerprints(splits) -> dict[str, str]:
    """Each split's :func:`fingerprint`, by split name."""
    return {name: fingerprint(split.images, split.labels)
            for name in ("train", "val", "test") if (split := getattr(splits, name)) is not None}


def run_config(args, lr: float, fingerprints: dict[str, str]) -> dict:
    """What determines one learning rate's numbers (checked when a run resumes); ``fingerprints``:
    the splits' :func:`data_fingerprints`."""
    config = {"batch_norm": args.batch_norm, "lr": lr, "batch_size": args.batch_size, "seed": args.seed,
              "impl": args.impl, "train_data": fingerprints["train"], "val_data": fingerprints["val"]}
    if args.pool != "average":
        config["pool"] = args.pool
    return config


def make_run(args, lr: float, fingerprints: dict[str, str], devices, log) -> tuple[Run, Trainer]:
    """One learning rate's :class:`Run` in lr_<lr>/ (resumed if there) and its trainer;
    ``fingerprints``: the splits' :func:`data_fingerprints`."""
    trainer = Trainer(args.batch_norm, lr, args.batch_size, args.seed, devices, impl=args.impl, pool=args.pool)
    run = Run(run_dir(args.out, lr), run_config(args, lr, fingerprints), trainer, kind="cnn", epochs=args.epochs,
              metric="val_acc", maximize=True, log=log, label=f"lr={lr:g} ")
    return run, trainer


def validation(trainer: Trainer, splits) -> Callable:
    """``state -> {"val_acc", "val_loss"}`` on the validation split, held on the devices."""
    images, labels = trainer.put(splits.val.images), trainer.put(splits.val.labels)

    def validate(state) -> dict:
        result = trainer.evaluate(state, images, labels)
        return {"val_acc": result["acc"], "val_loss": result["loss"]}

    return validate


def train_sequentially(run: Run, trainer: Trainer, splits, validate) -> None:
    """One learning rate at a time: a jitted SGD step per batch."""
    images, labels = splits.train.images, splits.train.labels
    fit(run, lambda state, epoch, progress: trainer.train_epoch(state, images, labels, epoch, progress), validate,
        steps=math.ceil(len(splits.train) / trainer.batch_size))


def train_vmapped(runs: list[Run], trainers: list[Trainer], splits, validate, log) -> None:
    """Every unfinished learning rate as one vmapped program (``--vmap-sweep``); a member that
    diverges is carried along, ignored. Runs that stopped at different epochs (a sweep killed
    between two members' saves) go back to the latest epoch all of them reached. Each record's
    ``seconds`` is the epoch's time shared out equally among the members trained in it."""
    todo = [i for i, run in enumerate(runs) if not run.finished]
    if not todo:
        return
    common = min(runs[i].epochs_done for i in todo)
    for i in todo:
        runs[i].rewind(common, trainers[i])
    members = [runs[i] for i in todo]
    args_lrs = [trainers[i].lr for i in todo]
    lead = trainers[todo[0]]
    sweep = SweepTrainer(lead.batch_norm, args_lrs, lead.batch_size, lead.seed, list(lead.mesh.devices.flat),
                         lead.impl, lead.pool)
    state = sweep.stack([run.state for run in members])
    steps = math.ceil(len(splits.train) / lead.batch_size)
    log(f"training lr={', '.join(f'{lr:g}' for lr in args_lrs)} as one vmapped program")
    for epoch in range(common, members[0].epochs):
        live = [k for k, run in enumerate(members) if not run.finished]
        if not live:
            break
        tick = time.perf_counter()
        with progress_bar(steps, f"lr sweep epoch {epoch + 1}/{members[0].epochs}") as bar:
            state, losses = sweep.train_epoch(state, splits.train.images, splits.train.labels, epoch, bar.update)
        seconds = (time.perf_counter() - tick) / len(live)
        for k in live:
            members[k].end_epoch(epoch, sweep.member(state, k), float(losses[k]), seconds, validate)


def is_cnn_run(directory) -> Callable[[dict], None]:
    """A ``check_meta`` for :meth:`Checkpoints.resume`: a one-line error for a checkpoint of another kind."""
    def check(meta: dict) -> None:
        if "batch_norm" not in meta.get("config", {}):
            raise UserError(f"{directory}: not a CNN checkpoint (expected one written by python -m experiments.cnn)")
    return check


def test_accuracy(checkpoints: Checkpoints, trainer: Trainer, split, log=print) -> tuple[float, np.ndarray]:
    _, state, _ = checkpoints.resume(trainer.abstract_state(), is_cnn_run(checkpoints.directory), log)
    result = trainer.evaluate(state, trainer.put(split.images), trainer.put(split.labels))
    return result["acc"], result["preds"]


def log_duplicates(splits, log) -> None:
    summary = find_duplicates(splits).summary()
    if summary:
        log(summary)


def cmd_train(args, log) -> int:
    splits = load(args.data, tfds_dir=args.tfds_dir, log=log)
    if splits.train is None or splits.val is None or len(splits.train) == 0 or len(splits.val) == 0:
        raise UserError(f"{args.data}: training needs non-empty train and val splits")
    fingerprints = data_fingerprints(splits)
    check_same_run(args, resolved(CNNConfig, args), fingerprints)  # every process of a multi-process run alike
    if args.batch_size > len(splits.train):
        raise UserError(f"--batch-size {args.batch_size} is more than the {len(splits.train)} training images of {args.data}")
    try:
        check_batch_norm_batch(args.batch_norm, args.batch_size)
    except BatchNormBatchError as err:
        raise UserError(f"--batch-size {err.batch_size} with --batch-norm: {err}") from None
    devices = run_devices(args.devices)
    if args.batch_size % len(devices):
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the {len(devices)} devices")
    args.out.mkdir(parents=True, exist_ok=True)
    name = ("batch-norm CNN" if args.batch_norm else "baseline CNN") + (", Hopfield pooling" if args.pool == "hopfield" else "")
    log(f"{name}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test) if splits.test else 0} test "
        f"images from {args.data}; batches split over {len(devices)} device(s) in {jax.process_count()} process(es); "
        f"out: {args.out}")
    log_duplicates(splits, warn)
    others = sorted({d.name for d in args.out.glob("lr_*/") if d.is_dir()} - {run_dir(args.out, lr).name for lr in args.lr})
    if others:
        warn(f"note: {args.out} also holds {', '.join(others)} from another command; this command's metrics.json and "
             f"plots cover --lr {' '.join(f'{lr:g}' for lr in args.lr)} only (pass every --lr to compare them all)")
    made = [make_run(args, lr, fingerprints, devices, log) for lr in args.lr]
    runs, trainers = [run for run, _ in made], [trainer for _, trainer in made]
    resumable_from(args.out)
    validate = validation(trainers[0], splits)
    if args.vmap_sweep:
        train_vmapped(runs, trainers, splits, validate, log)
    else:
        for run, trainer in made:
            if not run.finished:
                train_sequentially(run, trainer, splits, validate)
    for run in runs:
        run.close()
    by_name = {f"{run.meta['config']['lr']:g}": run for run in runs}
    chosen = select(by_name)
    test = None
    if chosen is not None and splits.test is not None and len(splits.test):
        run, trainer = made[list(by_name).index(chosen)]
        with BestCheckpoint(run.directory / "best") as best:
            acc, preds = test_accuracy(best, trainer, splits.test, log)
        last = Checkpoints(run.directory / "ckpt", read_only=True)
        final, _ = test_accuracy(last, trainer, splits.test, log)
        last.close()
        counts = confusion_matrix(splits.test.labels, preds)
        test = {"acc": acc, "final_epoch_acc": final, "confusion_matrix": counts.tolist()}
        if is_main_process():
            plot_confusion(counts, CLASS_NAMES, args.out, f"{name}, lr={chosen}, test acc {acc:.3f}")
    if is_main_process():
        plot_curves({f"lr={name_}": run.meta["history"] for name_, run in by_name.items()}, args.out, name)
    model = trainers[0].model(trainers[0].init_state())
    result = metrics("cnn", resolved(CNNConfig, args), by_name, chosen, test,
                     model=("batch_norm" if args.batch_norm else "baseline") + ("" if args.pool == "average" else f"_{args.pool}_pool"),
                     params=count_params(model), devices=len(devices), processes=jax.process_count())
    write_metrics(args.out, result)
    for run in runs:
        log(run.summary())
    if chosen is None:
        raise UserError(f"every learning rate diverged; nothing to select (history in {args.out / 'metrics.json'})")
    selected = result["selected"]
    summary = f"selected lr={chosen} (epoch {selected['epoch']}, val acc {selected['val']['val_acc']:.4f})"
    if test is not None:
        summary += f": test acc {test['acc']:.4f} (final epoch: {test['final_epoch_acc']:.4f})"
    log(summary + f"; {result['params']:,} parameters; {result['wall_s']:.0f} s of training")
    if is_main_process():
        print(strict_json({"lr": float(chosen), "epoch": selected["epoch"], "val_acc": selected["val"]["val_acc"],
                           **({"test_acc": test["acc"], "final_epoch_test_acc": test["final_epoch_acc"]} if test else {})}))
    return 0


def find_best_checkpoint(path: Path) -> Path:
    """A sweep's --out (its selected lr), a run directory lr_<lr>, or a checkpoint directory; a
    run's best/ even where it is missing or damaged, as long as its ckpt/ is there
    (:class:`BestCheckpoint` reads the best epoch from ckpt/ then)."""
    metrics = read_metrics(path, "cnn")
    if metrics is not None:
        if metrics.get("part") is None:
            raise UserError(f"{path / 'metrics.json'} was written by an earlier version of this command; "
                            "train again into a new --out to evaluate with this version")
        selected = metrics.get("selected")
        checkpoint = selected.get("checkpoint") if isinstance(selected, dict) else None
        if not isinstance(checkpoint, str):
            raise UserError(f"{path / 'metrics.json'}: no selected run (expected the metrics.json "
                            "of a finished training run)")
        path = path / Path(checkpoint).parent.name  # lr_<lr>, wherever the run folder has moved
    if (path / "best").is_dir() or is_checkpoint_dir(path / "ckpt"):
        path = path / "best"
    if not (is_checkpoint_dir(path) or path.name == "best" and is_checkpoint_dir(path.parent / "ckpt")):
        runs = sorted(d.name for d in path.glob("lr_*/") if d.is_dir())
        if runs:  # a sweep's --out without metrics.json (stopped before the end): name its runs
            raise UserError(f"{path}: no metrics.json to say which run was selected; pass one of its runs "
                            f"({', '.join(str(path / r) for r in runs)})")
        raise UserError(f"{path}: no checkpoint here (expected a training --out, an lr_<lr> run or its best/ folder)")
    return path


def cmd_evaluate(args, log) -> int:
    from experiments._checkpoint import BestCheckpoint
    from experiments._cli import warn

    if not args.evaluate.exists():
        raise UserError(f"{args.evaluate}: no such checkpoint")
    checkpoints = BestCheckpoint(find_best_checkpoint(args.evaluate))
    meta = checkpoints.newest_meta(log)
    is_cnn_run(checkpoints.directory)(meta)
    config = meta["config"]
    splits = load(args.data, required=("test",), tfds_dir=args.tfds_dir, log=log)
    log_duplicates(splits, warn)
    split = splits.test
    trainer = Trainer(config["batch_norm"], config["lr"], config["batch_size"], config["seed"], impl=args.impl,
                      pool=config.get("pool", "average"))
    acc, _ = test_accuracy(checkpoints, trainer, split, log)
    checkpoints.close()
    log(f"{checkpoints.directory}: test accuracy {acc:.4f} on {len(split)} images of {args.data}")
    print(strict_json({"test_acc": acc}))
    return 0


def main(argv=None) -> int:
    from experiments._cli import seed

    parser = ArgumentParser(prog="python -m experiments.cnn", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(DEFAULTS.data),
                        help="homework .npz, Kaggle folder (seg_train/, seg_test/), or tfds:DIR to read "
                             "through the TFDS builder with manual dir DIR; default: %(default)s")
    parser.add_argument("--tfds-dir", type=Path, help="where TFDS prepares data (default: ~/tensorflow_datasets)")
    parser.add_argument("--lr", type=positive_float, nargs="+", default=list(DEFAULTS.lr), help="learning rate(s) to sweep, SGD (default: %(default)s; the homework's sweep: 0.1 0.01 0.001)")
    parser.add_argument("--batch-norm", action="store_true", help="the BN + global-average-pooling variant")
    parser.add_argument("--pool", choices=("average", "hopfield"), default=DEFAULTS.pool,
                        help="the BN variant's pooling: global average, or a HopfieldPooling layer over the 6x6 grid "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULTS.epochs, help="training epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size, help="images a step (default: %(default)s)")
    parser.add_argument("--seed", type=seed, default=DEFAULTS.seed, help="seed of the initial parameters, batches and dropout (default: %(default)s)")
    parser.add_argument("--out", type=folder, help="results folder (default: runs/cnn or runs/cnn-bn)")
    parser.add_argument("--evaluate", type=Path, metavar="CHECKPOINT", help="evaluate a saved model on --data's test split")
    parser.add_argument("--vmap-sweep", action="store_true",
                        help="train all --lr values at once as one vmapped program (same batches and dropout keys)")
    add_run_options(parser, "cnn.xla_cpu")
    add_parallel_options(parser)
    args = parser.parse_args(argv)
    folders = [run_dir(Path(), lr).name for lr in args.lr]
    if len(set(folders)) < len(folders):
        parser.error(f"--lr {' '.join(map(str, args.lr))}: the same learning rate twice (each gets the folder lr_<lr>)")
    log = logger(args.quiet)
    if args.pool != "average" and not args.batch_norm:
        parser.error("--pool hopfield replaces the BN variant's average pooling: add --batch-norm")
    if args.out is None:
        args.out = Path("runs/cnn-bn-hopfield" if args.pool == "hopfield" else "runs/cnn-bn" if args.batch_norm else "runs/cnn")
    if not start_parallel(parser, args):  # only process 0 logs
        log = logger(True)
    args.impl = choose_impl(args.impl, log)
    if args.impl == "xla_cpu":  # before the first computation (see experiments/_xla.py)
        tune_cpu()
        cnn_retains_memory(args.batch_size * (len(args.lr) if args.vmap_sweep else 1))
    return cmd_evaluate(args, log) if args.evaluate else cmd_train(args, log)


if __name__ == "__main__":
    run(main, user_errors=(DataError,))
