"""README statements that can be checked against each other."""

from __future__ import annotations

import re

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_the_default_intel_file_accounts_for_every_labelled_scene():
    found = re.search(r"all ([\d,]+)\s+labelled scenes: ([\d,]+) train / ([\d,]+) val / ([\d,]+) test; the other ([\d,]+)",
                      README)
    assert found, "the split sentence of the default .npz"
    total, *parts = map(number, found.groups())
    assert sum(parts) == total, (parts, total)


def test_the_verify_timing_is_given_once():
    paragraphs = [p for p in README.split("\n\n") if "verif" in p and re.search(r"\b\d+(\.\d+)? s\b", p)]
    assert len(paragraphs) == 1, paragraphs


def test_plot_attention_examples_say_they_need_the_words_in_the_data():
    lines = README.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("python -m experiments.p2g test") and re.search(r"--plot-attention (?!WORD)", line):
            assert "not in the evaluated data" in " ".join(lines[i : i + 6]), line
