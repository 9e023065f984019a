"""The E2E NLG Challenge metrics, defined as the official script (tuetschek/e2e-metrics) defines them.

- BLEU and NIST as the script's `mteval-v13a-sig.pl` computes them: its tokenization (ASCII
  lowercasing, punctuation split), corpus-level counts, the closest-reference brevity penalty and
  the smoothed BLEU, NIST information weights from the reference corpus, 5-grams. Instances with
  fewer references than the most are padded with empty references, as `measure_scores.py` does
  before it writes the SGML files mteval reads, and the "-sig" edit of mteval makes those empty
  references count for nothing: the brevity penalty's closest length skips them, and NIST's
  average reference length divides by the mean number of non-empty references per instance
  (not by the padded count; outputs much shorter than their references showed the difference).
  The script's Python port (`-p`) differs in NIST there; the Perl figure is the official one.
- METEOR 1.5 (`-l en -norm`), ROUGE-L (beta 1.2) and CIDEr (n 4, sigma 6) with `pycocoevalcap`
  on PTB-tokenized text: the same jars the official script runs. `COCOEvalCap.evaluate()` is
  not used: it also runs SPICE, which downloads models at run time.

Inputs: one list of references per instance and one hypothesis per instance. Files are read as the
script reads them: references one a line with a blank line between instances (a file without blank
lines holds one reference per instance), outputs one a line.

`tests/test_e2e_metrics.py` holds all five figures equal to the official script's on generated cases.
"""

from __future__ import annotations

import math
import re
import shutil
import string
from collections import Counter
from pathlib import Path

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
MAX_NGRAM = 9  # mteval counts n-grams up to 9; BLEU reports 4-grams, NIST 5-grams

_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")


class JavaMissing(RuntimeError):
    """METEOR and the PTB tokenizer run Java; say how to get it."""


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's default (Western) tokenization, lowercased as the E2E script runs it."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} ".translate(_LOWER)  # tr/[A-Z]/[a-z]/: ASCII letters only
    text = _PUNCT.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", text)  # period and comma, unless preceded by a digit
    text = re.sub(r"([\.,])([^0-9])", r" \1 \2", text)  # ... unless followed by a digit
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)  # dash after a digit
    return text.split()


def _ngrams(words: list[str]) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + n]) for n in range(1, MAX_NGRAM + 1) for i in range(len(words) - n + 1))


def _closest(current: int, ref_len: int, hyp_len: int) -> int:
    """mteval's closest reference length; on a tie, the shorter; an empty reference is no candidate."""
    if ref_len == 0:
        return current
    if abs(hyp_len - ref_len) < abs(hyp_len - current):
        return ref_len
    if abs(hyp_len - ref_len) == abs(hyp_len - current):
        return min(current, ref_len)
    return current


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def bleu_nist(references: list[list[str]], hypotheses: list[str]) -> tuple[float, float]:
    """Corpus BLEU (4-gram, smoothed, closest brevity) and NIST (5-gram) as mteval-v13a computes them."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} instances of references but {len(hypotheses)} hypotheses")
    n_refs = max(len(refs) for refs in references)
    ref_words = [[mteval_tokenize(r) for r in refs] + [[]] * (n_refs - len(refs)) for refs in references]
    hyp_words = [mteval_tokenize(h) for h in hypotheses]

    ref_grams = [[_ngrams(words) for words in refs] for refs in ref_words]  # counted once, used twice below
    # Information weights from every reference n-gram: -log2(count(w1..wn) / count(w1..wn-1)).
    ref_counts: Counter[tuple[str, ...]] = Counter()
    for grams in ref_grams:
        for counts in grams:
            ref_counts.update(counts)
    total_words = sum(len(words) for refs in ref_words for words in refs)
    info = {g: -math.log2(c / (ref_counts[g[:-1]] if len(g) > 1 else total_words)) for g, c in ref_counts.items()}

    # NIST's references per instance: the mean count of non-empty ones (mteval-v13a-sig's nsys)
    mean_refs = sum(1 for refs in ref_words for words in refs if words) / len(ref_words)
    ref_length = 0
    match = [0] * (MAX_NGRAM + 1)
    hyp_count = [0] * (MAX_NGRAM + 1)
    ref_count = [0] * (MAX_NGRAM + 1)
    hyp_info = [0.0] * (MAX_NGRAM + 1)
    for refs, grams, words in zip(ref_words, ref_grams, hyp_words):
        for n in range(1, MAX_NGRAM + 1):
            hyp_count[n] += max(0, len(words) - n + 1)
        best: Counter[tuple[str, ...]] = Counter()
        seg_ref_length = None
        for ref, ref_ngrams in zip(refs, grams):
            for gram, count in ref_ngrams.items():
                best[gram] = max(best[gram], count)
            for n in range(1, MAX_NGRAM + 1):
                ref_count[n] += max(0, len(ref) - n + 1)
            seg_ref_length = len(ref) if seg_ref_length is None else _closest(seg_ref_length, len(ref), len(words))
        ref_length += seg_ref_length or 0
        for gram, count in _ngrams(words).items():
            if gram in best:
                clipped = min(count, best[gram])
                match[len(gram)] += clipped
                hyp_info[len(gram)] += info[gram] * clipped

    length_score = math.exp(min(0.0, 1 - ref_length / hyp_count[1])) if hyp_count[1] > 0 else 0.0
    log_sum, smooth, bleu = 0.0, 1, 0.0
    for n in range(1, 5):
        if hyp_count[n] == 0:
            log_precision = 0.0
        elif match[n] == 0:
            smooth *= 2
            log_precision = math.log(1 / (smooth * hyp_count[n]))
        else:
            log_precision = math.log(match[n] / hyp_count[n])
        log_sum += log_precision
        bleu = math.exp(log_sum / n) * length_score

    nist = sum(hyp_info[n] / max(hyp_count[n], 1) for n in range(1, 6))
    nist *= _nist_length_penalty(hyp_count[1] / (ref_count[1] / mean_refs))
    return bleu, nist


def coco_metrics(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """METEOR, ROUGE_L and CIDEr from pycocoevalcap on PTB-tokenized, lowercased text (needs Java)."""
    return coco_metrics_many([(references, hypotheses)])[0]


def coco_metrics_many(corpora: list[tuple[list[list[str]], list[str]]]) -> list[dict[str, float]]:
    """`coco_metrics` of each corpus, with one PTB tokenizer run and one METEOR process for all of them
    (each caption is tokenized on its own, and METEOR scores each corpus in its own EVAL request)."""
    if shutil.which("java") is None:
        raise JavaMissing("the E2E metrics METEOR and the PTB tokenizer need Java: install a JRE "
                          "(e.g. apt-get install default-jre-headless) and put `java` on PATH")
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts_all = tokenizer.tokenize({(c, i): [{"caption": r} for r in refs]
                                  for c, (references, _) in enumerate(corpora) for i, refs in enumerate(references)})
    res_all = tokenizer.tokenize({(c, i): [{"caption": h}]
                                  for c, (_, hypotheses) in enumerate(corpora) for i, h in enumerate(hypotheses)})
    meteor = Meteor()  # a Java process; its __del__ stops it
    out = []
    for c, (references, _) in enumerate(corpora):
        gts = {i: gts_all[(c, i)] for i in range(len(references))}
        res = {i: res_all[(c, i)] for i in range(len(references))}
        meteor_score, _ = meteor.compute_score(gts, res)
        rouge_score, _ = Rouge().compute_score(gts, res)
        cider_score, _ = Cider().compute_score(gts, res)
        out.append({"METEOR": float(meteor_score), "ROUGE_L": float(rouge_score), "CIDEr": float(cider_score)})
    del meteor
    return out


def score(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """All five E2E metrics, keyed as the official script prints them."""
    return score_many([(references, hypotheses)])[0]


def score_many(corpora: list[tuple[list[list[str]], list[str]]]) -> list[dict[str, float]]:
    """The five metrics of each corpus (references, hypotheses), each corpus scored on its own; Java (the
    PTB tokenizer, METEOR) starts once for all of them."""
    for references, hypotheses in corpora:
        if len(references) != len(hypotheses):
            raise ValueError(f"{len(references)} instances of references but {len(hypotheses)} hypotheses")
    coco = coco_metrics_many(corpora)
    return [{"BLEU": bleu, "NIST": nist, **extra}
            for (bleu, nist), extra in zip((bleu_nist(r, h) for r, h in corpora), coco)]


class BadReferences(ValueError):
    """A references file the official script would misread; names the line."""


def read_references(path: Path) -> list[list[str]]:
    """The official reference format: one reference a line, instances separated by a blank line.

    As `measure_scores.py` reads it: a file without blank lines holds one reference per instance
    (one per line). A blank line at the start or two in a row would make an instance without
    references, which the script misaligns: refused, naming the line.
    """
    instances: list[list[str]] = [[]]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if line:
            instances[-1].append(line)
        elif not instances[-1]:
            raise BadReferences(f"{path}: line {number} is a blank line that starts an instance without references; "
                                "separate instances by one blank line")
        else:
            instances.append([])
    if not instances[-1]:
        instances.pop()
    if len(instances) == 1:
        return [[line] for line in instances[0]]
    return instances


def read_hypotheses(path: Path) -> list[str]:
    """One system output a line."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
