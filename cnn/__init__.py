"""CNNs on the Intel Image Classification scenes in Flax NNX (IST DL 2024-25, Homework 2, Question 2)."""

from cnn.data import CLASS_NAMES, DataError, Split, Splits, load, load_kaggle, load_npz
from cnn.model import CNN, IMPLS, POOLS, ConvBlock, count_params
from cnn.train import (
    BatchNormBatchError,
    SweepTrainer,
    Trainer,
    TrainState,
    confusion_matrix,
    nll_loss,
)

__all__ = [
    "BatchNormBatchError",
    "CLASS_NAMES",
    "CNN",
    "ConvBlock",
    "IMPLS",
    "POOLS",
    "DataError",
    "Split",
    "Splits",
    "SweepTrainer",
    "TrainState",
    "Trainer",
    "confusion_matrix",
    "count_params",
    "load",
    "load_kaggle",
    "load_npz",
    "nll_loss",
]
