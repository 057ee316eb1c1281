"""P2G error rates with jiwer.

CER = total character edit distance / total reference length (jiwer.cer over the corpus).
WER = fraction of words not spelled exactly right (each reference is one word, so jiwer.wer's
word-level count is 1 per wrong word). WER@k = fraction of words none of whose k samples is right.
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    return float(jiwer.cer(list(references), list(hypotheses)))


def _one_token(text: str) -> str:
    return text.replace(" ", "\u2581")  # a multi-word entry ('ice cream') stays one jiwer word


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Exact-match error rate, by jiwer on one-token 'sentences' (an empty hypothesis is one
    deletion, a wrong one one substitution)."""
    return float(jiwer.wer([_one_token(r) for r in references], [_one_token(h) for h in hypotheses]))


def wer_at_k(references: Sequence[str], samples: Sequence[Sequence[str]]) -> float:
    """``samples[j][i]``: the j-th sample for word i. Fraction of words with no correct sample."""
    misses = [all(s[i] != ref for s in samples) for i, ref in enumerate(references)]
    return sum(misses) / len(references)
