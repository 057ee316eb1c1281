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

from cnn.data import CLASS_NAMES, DEFAULT_NPZ, DataError, find_duplicates, load
from cnn.model import count_params
from cnn.train import SweepTrainer, Trainer, confusion_matrix
from experiments._checkpoint import Checkpoints, RunCheckpoints, is_checkpoint_dir
from experiments._cnn_plots import plot_confusion, plot_curves
from experiments._xla import choose_impl, cnn_retains_memory, tune_cpu
from experiments._cli import ArgumentParser, UserError, add_run_options, logger, strict_json, positive_float, positive_int, resumable_from, run


def run_dir(out: Path, lr: float) -> Path:
    return out / f"lr_{lr:g}"


class Run:
    """One learning rate's run: its trainer, checkpoints (lr_<lr>/ckpt every epoch, lr_<lr>/best)
    and ``meta`` (config, per-epoch history, best epoch, divergence); restored if present."""

    def __init__(self, splits, lr: float, args, log):
        self.lr, self.args, self.log, self.splits = lr, args, log, splits
        directory = run_dir(args.out, lr)
        config = {
            "batch_norm": args.batch_norm,
            "lr": lr,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "train_examples": len(splits.train),
            "impl": args.impl,
        }
        if args.pool != "average":
            config["pool"] = args.pool
        self.trainer = Trainer(args.batch_norm, lr, args.batch_size, args.seed, impl=args.impl, pool=args.pool)
        self.checkpoints = RunCheckpoints(directory)
        self.meta = {"config": config, "history": [], "diverged": False, "best_epoch": None, "best_val_acc": -1.0}
        self.state = self.trainer.init_state()

        def check(meta):
            saved = meta.get("config", {})
            saved.setdefault("impl", "xla_cpu")  # runs from before --impl computed xla_cpu's function
            if saved != config:
                differ = sorted(k for k in config.keys() | saved.keys() if config.get(k) != saved.get(k))
                raise UserError(f"{directory} holds a run with other settings "
                                f"({', '.join(f'{k}: {saved.get(k)!r}' for k in differ)}); choose another --out")
            if len(meta["history"]) > args.epochs:
                raise UserError(f"{directory} holds {len(meta['history'])} epochs, more than --epochs {args.epochs}; "
                                "choose another --out or at least as many epochs")

        resumed = self.checkpoints.resume(self.trainer.abstract_state(), check, log)
        if resumed is not None:
            self.state, self.meta = resumed
            self.meta["config"].setdefault("impl", "xla_cpu")
            log(f"lr={lr:g}: resuming after epoch {self.epochs_done}")

    @property
    def epochs_done(self) -> int:
        return len(self.meta["history"])

    @property
    def finished(self) -> bool:
        return self.meta["diverged"] or self.epochs_done >= self.args.epochs

    def end_epoch(self, epoch: int, state, train_loss: float, seconds: float, val_images, val_labels) -> None:
        """Validate, record, checkpoint and log one finished epoch; a non-finite loss ends the run."""
        self.state = state
        finite = math.isfinite(train_loss)
        val = self.trainer.evaluate(state, val_images, val_labels) if finite else {"acc": None, "loss": None}
        record = {"epoch": epoch + 1, "train_loss": train_loss if finite else None, "val_acc": val["acc"],
                  "val_loss": val["loss"], "seconds": seconds}
        self.meta["history"].append(record)
        if not finite:
            self.meta["diverged"] = True
            self.log(f"lr={self.lr:g} epoch {epoch + 1}: training loss is {train_loss}; this run diverged, stopping it")
            self.checkpoints.save_epoch(epoch, state, self.meta, best=False)
            return
        improved = val["acc"] > self.meta["best_val_acc"]
        if improved:
            self.meta["best_epoch"], self.meta["best_val_acc"] = epoch + 1, val["acc"]
        self.checkpoints.save_epoch(epoch, state, self.meta, best=improved)
        self.log(f"lr={self.lr:g} epoch {epoch + 1:>2}/{self.args.epochs}: train loss {train_loss:.4f}  "
                 f"val acc {val['acc']:.4f}  ({seconds:.1f} s)")

    def close(self) -> None:
        self.checkpoints.close()


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None)


def train_sequentially(run: Run, splits) -> None:
    """One learning rate at a time: a jitted SGD step per batch."""
    trainer = run.trainer
    images, labels = trainer.put(splits.train.images), trainer.put(splits.train.labels)
    val_images, val_labels = trainer.put(splits.val.images), trainer.put(splits.val.labels)
    steps = math.ceil(len(splits.train) / run.args.batch_size)
    for epoch in range(run.epochs_done, run.args.epochs):
        tick = time.perf_counter()
        with progress_bar(steps, f"lr={run.lr:g} epoch {epoch + 1}/{run.args.epochs}") as bar:
            state, train_loss = trainer.train_epoch(run.state, images, labels, epoch, progress=bar.update)
        run.end_epoch(epoch, state, train_loss, time.perf_counter() - tick, val_images, val_labels)
        if run.finished:
            break


def train_vmapped(runs: list[Run], splits, log) -> None:
    """Every unfinished learning rate as one vmapped program (``--vmap-sweep``); a member that
    diverges is carried along, ignored. Each record's ``seconds`` is the epoch's time shared out
    equally among the members trained in it."""
    todo = [run for run in runs if not run.finished]
    if not todo:
        return
    if len({run.epochs_done for run in todo}) > 1:
        log("--vmap-sweep: the runs to resume stopped at different epochs; training them one at a time")
        for run in todo:
            train_sequentially(run, splits)
        return
    args = todo[0].args
    sweep = SweepTrainer(args.batch_norm, [run.lr for run in todo], args.batch_size, args.seed, impl=args.impl,
                         pool=args.pool)
    state = sweep.stack([run.state for run in todo])
    images, labels = sweep.members[0].put(splits.train.images), sweep.members[0].put(splits.train.labels)
    val_images, val_labels = sweep.members[0].put(splits.val.images), sweep.members[0].put(splits.val.labels)
    steps = math.ceil(len(splits.train) / args.batch_size)
    log(f"training lr={', '.join(f'{run.lr:g}' for run in todo)} as one vmapped program")
    for epoch in range(todo[0].epochs_done, args.epochs):
        live = [i for i, run in enumerate(todo) if not run.finished]
        if not live:
            break
        tick = time.perf_counter()
        with progress_bar(steps, f"lr sweep epoch {epoch + 1}/{args.epochs}") as bar:
            state, losses = sweep.train_epoch(state, images, labels, epoch, progress=bar.update)
        seconds = (time.perf_counter() - tick) / len(live)
        for i in live:
            todo[i].end_epoch(epoch, sweep.member(state, i), float(losses[i]), seconds, val_images, val_labels)


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
    if args.batch_size > len(splits.train):
        raise UserError(f"--batch-size {args.batch_size} is more than the {len(splits.train)} training images of {args.data}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = ("batch-norm CNN" if args.batch_norm else "baseline CNN") + (", Hopfield pooling" if args.pool == "hopfield" else "")
    log(
        f"{name}: {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test) if splits.test else 0} test images from {args.data}; out: {args.out}"
    )
    log_duplicates(splits, log)
    members = [Run(splits, lr, args, log) for lr in args.lr]
    resumable_from(args.out)
    if args.vmap_sweep:
        train_vmapped(members, splits, log)
    else:
        for run in members:
            if not run.finished:
                train_sequentially(run, splits)
    for run in members:
        run.close()
    runs = {run.lr: run.meta for run in members}

    finished = {lr: m for lr, m in runs.items() if not m["diverged"] and m["best_epoch"] is not None}
    if not finished:
        raise UserError("every learning rate diverged; nothing to select")
    lr = max(finished, key=lambda k: finished[k]["best_val_acc"])
    trainer = Trainer(args.batch_norm, lr, args.batch_size, args.seed, impl=args.impl, pool=args.pool)
    selected = {"lr": lr, "epoch": finished[lr]["best_epoch"], "val_acc": finished[lr]["best_val_acc"]}
    if splits.test is not None and len(splits.test):
        selected["test_acc"], preds = test_accuracy(Checkpoints(run_dir(args.out, lr) / "best"), trainer, splits.test, log)
        selected["final_epoch_test_acc"], _ = test_accuracy(Checkpoints(run_dir(args.out, lr) / "ckpt"), trainer, splits.test, log)
        counts = confusion_matrix(splits.test.labels, preds)
        plot_confusion(counts, CLASS_NAMES, args.out, f"{name}, lr={lr:g}, test acc {selected['test_acc']:.3f}")
        selected["confusion_matrix"] = counts.tolist()

    plot_curves({f"lr={k:g}": m["history"] for k, m in runs.items()}, args.out, name)
    metrics = {
        "model": ("batch_norm" if args.batch_norm else "baseline") + ("" if args.pool == "average" else f"_{args.pool}_pool"),
        "impl": args.impl,
        "params": count_params(trainer.model(trainer.init_state())),
        "data": str(args.data),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "runs": {f"{k:g}": m for k, m in runs.items()},
        "selected": selected,
        "wall_s": sum(h["seconds"] for m in runs.values() for h in m["history"]),
    }
    (args.out / "metrics.json").write_text(strict_json(metrics, indent=1))
    for k, m in runs.items():
        status = "diverged" if m["diverged"] else f"best val acc {m['best_val_acc']:.4f} at epoch {m['best_epoch']}"
        log(f"lr={k:g}: {status}")
    summary = f"selected lr={lr:g} (epoch {selected['epoch']}, val acc {selected['val_acc']:.4f})"
    if "test_acc" in selected:
        summary += f": test acc {selected['test_acc']:.4f} (final epoch: {selected['final_epoch_test_acc']:.4f})"
    log(summary + f"; {metrics['params']:,} parameters; {metrics['wall_s']:.0f} s of training")
    print(strict_json({k: v for k, v in selected.items() if k != "confusion_matrix"}))
    return 0


def find_best_checkpoint(path: Path) -> Path:
    """A sweep's --out (its selected lr), a run directory lr_<lr>, or a checkpoint directory; a
    run's best/ even where it is missing or damaged, as long as its ckpt/ is there
    (:class:`BestCheckpoint` reads the best epoch from ckpt/ then)."""
    from experiments._cli import read_json

    if (path / "metrics.json").is_file():
        metrics = read_json(path / "metrics.json", "the metrics.json of a training run")
        selected = metrics.get("selected") if isinstance(metrics, dict) else None
        lr = selected.get("lr") if isinstance(selected, dict) else None
        if not isinstance(lr, (int, float)):
            raise UserError(f"{path / 'metrics.json'}: no selected learning rate (expected the metrics.json "
                            "of a finished training run)")
        path = run_dir(path, lr)
    if (path / "best").is_dir() or is_checkpoint_dir(path / "ckpt"):
        path = path / "best"
    if not (is_checkpoint_dir(path) or path.name == "best" and is_checkpoint_dir(path.parent / "ckpt")):
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
    parser.add_argument("--data", type=Path, default=DEFAULT_NPZ,
                        help="homework .npz, Kaggle folder (seg_train/, seg_test/), or tfds:DIR to read "
                             "through the TFDS builder with manual dir DIR; default: %(default)s")
    parser.add_argument("--tfds-dir", type=Path, help="where TFDS prepares data (default: ~/tensorflow_datasets)")
    parser.add_argument("--lr", type=positive_float, nargs="+", default=[0.01], help="learning rate(s) to sweep, SGD (default: %(default)s; the homework's sweep: 0.1 0.01 0.001)")
    parser.add_argument("--batch-norm", action="store_true", help="the BN + global-average-pooling variant")
    parser.add_argument("--pool", choices=("average", "hopfield"), default="average",
                        help="the BN variant's pooling: global average, or a HopfieldPooling layer over the 6x6 grid "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=40, help="training epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images a step (default: %(default)s)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the initial parameters, batches and dropout (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="results folder (default: runs/cnn or runs/cnn-bn)")
    parser.add_argument("--evaluate", type=Path, metavar="CHECKPOINT", help="evaluate a saved model on --data's test split")
    parser.add_argument("--vmap-sweep", action="store_true",
                        help="train all --lr values at once as one vmapped program (same batches and dropout keys)")
    add_run_options(parser, "cnn.xla_cpu")
    args = parser.parse_args(argv)
    folders = [run_dir(Path(), lr).name for lr in args.lr]
    if len(set(folders)) < len(folders):
        parser.error(f"--lr {' '.join(map(str, args.lr))}: the same learning rate twice (each gets the folder lr_<lr>)")
    log = logger(args.quiet)
    args.impl = choose_impl(args.impl, log)
    if args.impl == "xla_cpu":  # before the first computation (see experiments/_xla.py)
        tune_cpu()
        cnn_retains_memory(args.batch_size * (len(args.lr) if args.vmap_sweep else 1))
    if args.pool != "average" and not args.batch_norm:
        parser.error("--pool hopfield replaces the BN variant's average pooling: add --batch-norm")
    if args.out is None:
        args.out = Path("runs/cnn-bn-hopfield" if args.pool == "hopfield" else "runs/cnn-bn" if args.batch_norm else "runs/cnn")
    from cnn.train import default_devices

    devices = len(default_devices())
    if args.batch_size % devices:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the {devices} devices")
    return cmd_evaluate(args, log) if args.evaluate else cmd_train(args, log)


if __name__ == "__main__":
    run(main, user_errors=(DataError,))
