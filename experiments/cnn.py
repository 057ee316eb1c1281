"""Train and evaluate the homework's CNNs on Intel scenes.

    python -m experiments.cnn --lr 0.01                      # one baseline model, 40 epochs of SGD
    python -m experiments.cnn --lr 0.1 0.01 0.001            # the sweep, selected by validation accuracy
    python -m experiments.cnn --batch-norm --lr 0.01         # the BN + global-average-pooling variant
    python -m experiments.cnn --lr 0.1 0.01 0.001 --vmap-sweep   # the sweep as one vmapped program
    python -m experiments.cnn --config best                  # beyond the homework (experiments/configs.py)
    python -m experiments.cnn --evaluate runs/cnn --data FILE.npz

Writes to --out: metrics.json, training_loss.png, val_accuracy.png, confusion_matrix.png and, per
learning rate, lr_<lr>/ckpt (orbax: every epoch saved, the latest two and the best validation
accuracy kept). Rerunning an interrupted command resumes from the last epoch checkpoint and ends with the same
metrics as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from cnn.data import CLASS_NAMES, DataError, find_duplicates, load
from cnn.model import count_params
from cnn.train import SweepTrainer, Trainer, confusion_matrix
from common.checkpoint import CheckpointError
from common.parallel import is_main_process
from common.training import OtherRun, Run, fingerprint, fit, read_best, select
from common.xla_cpu import choose_impl, cnn_retains_memory, tune_cpu
from experiments._cli import ArgumentParser, UserError, checkpoint_hints, logger, resumable_from, run, strict_json, warn
from experiments._parallel import check_same_run, start_parallel
from experiments._plots import plot_confusion, plot_curves
from experiments._training import batch_devices, checkpoint_folder, metrics, read_metrics, write_metrics
from experiments.configs import CNNConfig, add_flags, beyond_homework, from_args, optimizer, recorded, use_named


def run_dir(out: Path, lr: float) -> Path:
    return out / f"lr_{lr:g}"


def data_fingerprints(splits) -> dict[str, str]:
    """Each split's :func:`fingerprint`, by split name."""
    return {name: fingerprint(split.images, split.labels)
            for name in ("train", "val", "test") if (split := getattr(splits, name)) is not None}


def run_config(config: CNNConfig, lr: float, fingerprints: dict[str, str]) -> dict:
    """What determines one learning rate's numbers (checked when a run resumes); ``fingerprints``:
    the splits' :func:`data_fingerprints`."""
    identity = {"batch_norm": config.batch_norm, "lr": lr, "batch_size": config.batch_size, "seed": config.seed,
                "impl": config.impl, "train_data": fingerprints["train"], "val_data": fingerprints["val"]}
    if config.pool != "average":
        identity["pool"] = config.pool
    if config.dtype != "float32":
        identity["dtype"] = config.dtype
    return identity | beyond_homework(config)


def make_run(config: CNNConfig, lr: float, fingerprints: dict[str, str], devices, steps: int, log) -> tuple[Run, Trainer]:
    """One learning rate's :class:`Run` in lr_<lr>/ (resumed if there) and its trainer;
    ``fingerprints``: the splits' :func:`data_fingerprints`; ``steps``: an epoch's."""
    trainer = Trainer(config.batch_norm, lr, config.batch_size, config.seed, devices, impl=config.impl, pool=config.pool,
                      dtype=config.dtype, steps_per_call=config.steps_per_call, optimizer=optimizer("sgd", vars(config), config.epochs, steps),
                      augment=config.augment, label_smoothing=config.label_smoothing, width=config.width)
    run = Run(run_dir(config.workdir, lr), run_config(config, lr, fingerprints), trainer, kind="cnn", epochs=config.epochs,
              metric="val_acc", maximize=True, log=log, label=f"lr={lr:g} ")
    return run, trainer


def train(runs: list[Run], trainers: list[Trainer], splits, vmapped: bool, log, profile: Path | None = None) -> None:
    """Every unfinished learning rate: one run at a time, or all as one vmapped program;
    ``profile``: the folder of a trace of the first run trained (:func:`common.training.fit`)."""
    images, labels = splits.train.images, splits.train.labels
    steps, validate = math.ceil(len(splits.train) / trainers[0].batch_size), trainers[0].validation(splits.val)
    todo = [k for k, run in enumerate(runs) if not run.finished]
    if not vmapped:
        for k in todo:
            fit([runs[k]], lambda state, epoch, progress, t=trainers[k]: t.train_epoch(state, images, labels, epoch, progress),
                validate, steps, profile if k == todo[0] else None)
        return
    if todo:
        sweep = SweepTrainer([trainers[k] for k in todo])
        log(f"training lr={', '.join(f'{trainers[k].lr:g}' for k in todo)} as one vmapped program")
        fit([runs[k] for k in todo], lambda state, epoch, progress: sweep.train_epoch(state, images, labels, epoch, progress),
            validate, steps, profile)


def log_duplicates(splits, log) -> None:
    summary = find_duplicates(splits).summary()
    if summary:
        log(summary)


def training_data(config: CNNConfig, log):
    """The splits of ``--data`` and their fingerprints, checked for training (and alike on every
    process of a multi-process run)."""
    data = Path(config.data)
    splits = load(data, tfds_dir=config.tfds_dir, log=log)
    if splits.train is None or splits.val is None or len(splits.train) == 0 or len(splits.val) == 0:
        raise UserError(f"{data}: training needs non-empty train and val splits")
    fingerprints = data_fingerprints(splits)
    check_same_run(config, fingerprints)
    log_duplicates(splits, warn)
    return splits, fingerprints


def start_runs(config: CNNConfig, splits, fingerprints, name: str, log) -> tuple[list[Run], list[Trainer]]:
    """One :class:`Run` and trainer per learning rate, resumed where their folders hold epochs."""
    out = config.workdir
    read_metrics(out, "cnn")  # a one-line error where the P2G command wrote it
    devices = batch_devices(config.batch_size, len(splits.train), f"images of {config.data}", config.devices)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{name}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test) if splits.test else 0} test "
        f"images from {config.data}; batches split over {len(devices)} device(s) in {jax.process_count()} "
        f"process(es); out: {out}")
    others = sorted({d.name for d in out.glob("lr_*/") if d.is_dir()} - {run_dir(out, lr).name for lr in config.lr})
    if others:
        warn(f"note: {out} also holds {', '.join(others)} from another command; this command's metrics.json and "
             f"plots cover --lr {' '.join(f'{lr:g}' for lr in config.lr)} only (pass every --lr to compare them all)")
    steps = math.ceil(len(splits.train) / config.batch_size)
    made = [make_run(config, lr, fingerprints, devices, steps, log) for lr in config.lr]
    resumable_from(out)
    return [run for run, _ in made], [trainer for _, trainer in made]


def test_selected(run: Run, split) -> dict:
    """Test accuracy of the run's best checkpoint (with its confusion matrix) and of its last epoch."""
    trainer, images, labels = run.trainer, run.trainer.put(split.images), run.trainer.put(split.labels)
    best, final = (trainer.evaluate(run.saved_state(step), images, labels) for step in (None, run.checkpoints.steps()[-1]))
    return {"acc": best["acc"], "final_epoch_acc": final["acc"],
            "confusion_matrix": confusion_matrix(split.labels, best["preds"]).tolist()}


def report(result: dict, runs: list[Run], log) -> None:
    """Each run's summary line, the selection's, and the final JSON line."""
    for each in runs:
        log(each.summary())
    selected, test = result["selected"], result["test"]
    summary = f"selected lr={selected['run']} (epoch {selected['epoch']}, val acc {selected['val']['val_acc']:.4f})"
    if test is not None:
        summary += f": test acc {test['acc']:.4f} (final epoch: {test['final_epoch_acc']:.4f})"
    log(summary + f"; {result['params']:,} parameters; {result['wall_s']:.0f} s of training")
    if is_main_process():
        print(strict_json({"lr": float(selected["run"]), "epoch": selected["epoch"], "val_acc": selected["val"]["val_acc"],
                           **({"test_acc": test["acc"], "final_epoch_test_acc": test["final_epoch_acc"]} if test else {})}))


def cmd_train(config: CNNConfig, log) -> int:
    out = config.workdir
    name = ("batch-norm CNN" if config.batch_norm else "baseline CNN") + (", Hopfield pooling" if config.pool == "hopfield" else "")
    name += f" (--config {config.config})" if config.config != "homework" else ""
    splits, fingerprints = training_data(config, log)
    runs, trainers = start_runs(config, splits, fingerprints, name, log)
    train(runs, trainers, splits, config.vmap_sweep, log, config.profile)
    by_name = {f"{run.meta['config']['lr']:g}": run for run in runs}
    chosen = select(by_name)
    test = None
    if chosen is not None and splits.test is not None and len(splits.test):
        test = test_selected(by_name[chosen], splits.test)
        if is_main_process():
            plot_confusion(np.array(test["confusion_matrix"]), CLASS_NAMES, out, f"{name}, lr={chosen}, test acc {test['acc']:.3f}")
    if is_main_process():
        for key, ylabel, file, log_scale in (("train_loss", "training loss (NLL)", "training_loss.png", True),
                                             ("val_acc", "validation accuracy", "val_accuracy.png", False)):
            plot_curves({f"lr={lr}": (run.meta["history"], key) for lr, run in by_name.items()}, out / file, ylabel,
                        name, log_scale)
    model = ("batch_norm" if config.batch_norm else "baseline") + ("" if config.pool == "average" else f"_{config.pool}_pool")
    result = metrics("cnn", recorded(config), by_name, chosen, test, model=model,
                     params=count_params(trainers[0].model(trainers[0].init_state())),
                     devices=trainers[0].mesh.size, processes=jax.process_count())
    write_metrics(out, result)
    for each in runs:
        each.close()
    if chosen is None:
        for each in runs:
            log(each.summary())
        raise UserError(f"every learning rate diverged; nothing to select (history in {out / 'metrics.json'})")
    report(result, runs, log)
    return 0


def saved_trainer(saved: dict, impl: str) -> Trainer:
    """A trainer of the run whose identity (:func:`run_config`) is ``saved``, computing with
    ``impl``: its state has the saved state's structure (the schedule's length aside, which only
    training reads)."""
    return Trainer(saved["batch_norm"], saved["lr"], saved["batch_size"], saved["seed"], impl=impl,
                   pool=saved.get("pool", "average"), dtype=saved.get("dtype", "float32"),
                   optimizer=optimizer("sgd", saved, None), augment=saved.get("augment", "none"),
                   label_smoothing=saved.get("label_smoothing", 0.0), width=saved.get("width", 1))


def cmd_evaluate(config: CNNConfig, log) -> int:
    data, directory = Path(config.data), checkpoint_folder(Path(config.evaluate), "cnn")
    trainer, state, _ = read_best(directory, "cnn", lambda saved: saved_trainer(saved, config.impl))
    splits = load(data, required=("test",), tfds_dir=config.tfds_dir, log=log)
    log_duplicates(splits, warn)
    split = splits.test
    acc = trainer.evaluate(state, trainer.put(split.images), trainer.put(split.labels))["acc"]
    computing = f" (computing in {trainer.dtype}, as it was trained)" if trainer.dtype != "float32" else ""
    log(f"{directory}: test accuracy {acc:.4f} on {len(split)} images of {data}{computing}")
    print(strict_json({"test_acc": acc}))
    return 0


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m experiments.cnn", description=__doc__.split("\n")[0])
    add_flags(parser, CNNConfig)
    use_named(parser, CNNConfig, argv)
    config = from_args(parser, CNNConfig, parser.parse_args(argv))
    logs = start_parallel(config)  # joins the processes of a multi-process run; only process 0 logs
    log = logger(config.quiet or not logs)
    config = dataclasses.replace(config, impl=choose_impl(config.impl, log))
    if config.impl == "xla_cpu":  # before the first computation (see common/xla_cpu.py)
        tune_cpu()
        cnn_retains_memory(config.batch_size * (len(config.lr) if config.vmap_sweep else 1))
    return cmd_evaluate(config, log) if config.evaluate else cmd_train(config, log)


if __name__ == "__main__":
    run(main, user_errors=(DataError, CheckpointError, OtherRun), hints=checkpoint_hints())
