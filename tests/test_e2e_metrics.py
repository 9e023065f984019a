"""E2E NLG metrics against the official script's figures for its own example inputs.

The expected values are what `measure_scores.py` (tuetschek/e2e-metrics @ 1b9c4d8, mteval-v13a,
METEOR 1.5, CoreNLP 3.4.1) printed for `example-inputs/devel-conc.txt` and `baseline-output.txt`;
its Python port (`-p`) gives NIST 7.7889 there, since those instances have 6 to 39 references each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import datafiles
from pipeline.cli import app
from pipeline.eval import e2e_metrics

OFFICIAL = {"BLEU": "0.7203", "NIST": "7.8212", "METEOR": "0.4801", "ROUGE_L": "0.7910", "CIDEr": "2.3039"}


@pytest.fixture(scope="module")
def example() -> tuple[Path, Path]:
    return (datafiles.require("e2e/metric-check/devel-conc.txt"), datafiles.require("e2e/metric-check/baseline-output.txt"))


def test_mteval_tokenization():
    assert e2e_metrics.mteval_tokenize("The Eagle, a 3-star pub (near Café Rouge) costs £20.50.") == \
        ["the", "eagle", ",", "a", "3", "-", "star", "pub", "(", "near", "café", "rouge", ")", "costs", "£20.50", "."]
    assert e2e_metrics.mteval_tokenize("It's kid-friendly&amp;cheap") == ["it's", "kid-friendly", "&", "cheap"]


def test_bleu_and_nist_match_mteval_v13a(example):
    refs, hyps = (e2e_metrics.read_references(example[0]), e2e_metrics.read_hypotheses(example[1]))
    assert [len(r) for r in refs] == [6, 6, 6, 6, 9, 11, 37, 39, 10, 7] and len(hyps) == 10
    bleu, nist = e2e_metrics.bleu_nist(refs, hyps)
    assert (f"{bleu:.4f}", f"{nist:.4f}") == (OFFICIAL["BLEU"], OFFICIAL["NIST"])
    perfect = e2e_metrics.bleu_nist([r[:1] for r in refs], [r[0] for r in refs])[0]
    assert perfect == pytest.approx(1.0)


@pytest.mark.slow  # starts Java twice (PTB tokenizer, METEOR)
def test_loraforge_metrics_e2e_prints_the_official_scores(example):
    result = CliRunner().invoke(app, ["metrics", "e2e", str(example[0]), str(example[1])])
    assert result.exit_code == 0, result.output
    printed = [line for line in result.output.splitlines() if ": " in line and not line.startswith("PTBTokenizer")]
    assert printed == [f"{name}: {value}" for name, value in OFFICIAL.items()]


def test_bad_inputs_exit_2(example, tmp_path: Path):
    no_java = CliRunner().invoke(app, ["metrics", "e2e", str(example[0]), str(example[1])], env={"PATH": str(tmp_path)})
    assert no_java.exit_code == 2 and "need Java" in no_java.output and "Traceback" not in no_java.output
    short = tmp_path / "short.txt"
    short.write_text("only one line\n")
    mismatch = CliRunner().invoke(app, ["metrics", "e2e", str(example[0]), str(short)])
    assert mismatch.exit_code == 2 and "has 10 instances" in mismatch.output and "has 1 lines" in mismatch.output
    missing = CliRunner().invoke(app, ["metrics", "e2e", str(tmp_path / "nope.txt"), str(short)])
    assert missing.exit_code == 2 and "REFS: file" in missing.output
