"""P2G error rates with jiwer.

CER = total character edit distance / total reference length (jiwer.cer over the corpus).
WER = fraction of words not spelled exactly right (each reference is one word, so jiwer.wer's
word-level count is 1 per wrong word). WER@k = fraction of words none of whose k samples is right.
All three compare texts after one normalisation (:func:`canonical`), so a trailing space or a
decomposed accent counts the same in each.
"""

from __future__ import annotations

from collections.abc import Sequence

import unicodedata

import jiwer


def canonical(text: str) -> str:
    """NFC, whitespace at the ends removed and inner runs of it made one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    return float(jiwer.cer([canonical(r) for r in references], [canonical(h) for h in hypotheses]))


def _one_token(text: str) -> str:
    return canonical(text).replace(" ", "\u2581")  # a multi-word entry ('ice cream') stays one jiwer word


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Exact-match error rate, by jiwer on one-token 'sentences' (an empty hypothesis is one
    deletion, a wrong one one substitution)."""
    return float(jiwer.wer([_one_token(r) for r in references], [_one_token(h) for h in hypotheses]))


def wer_at_k(references: Sequence[str], samples: Sequence[Sequence[str]]) -> float:
    """``samples[j][i]``: the j-th sample for word i. Fraction of words with no correct sample."""
    misses = [all(canonical(s[i]) != canonical(ref) for s in samples) for i, ref in enumerate(references)]
    return sum(misses) / len(references)
