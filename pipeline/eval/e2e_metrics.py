"""The E2E NLG Challenge metrics, defined as the official script (tuetschek/e2e-metrics) defines them.

- BLEU and NIST as `mteval-v13a` computes them: its tokenization (ASCII lowercasing,
  punctuation split), corpus-level counts, the closest-reference brevity penalty and the
  smoothed BLEU, NIST information weights from the reference corpus, 5-grams. Instances with
  fewer references than the most are padded with empty references, as `measure_scores.py`
  does before it writes the SGML files mteval reads; NIST's reference length divides by
  that padded count (this is where the script's Python port `-p` differs).
- METEOR 1.5 (`-l en -norm`), ROUGE-L (beta 1.2) and CIDEr (n 4, sigma 6) with `pycocoevalcap`
  on PTB-tokenized text: the same jars the official script runs. `COCOEvalCap.evaluate()` is
  not used: it also runs SPICE, which downloads models at run time.

Inputs: one list of references per instance and one hypothesis per instance.
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
    """mteval's closest reference length; on a tie, the shorter."""
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
    nist *= _nist_length_penalty(hyp_count[1] / (ref_count[1] / n_refs))
    return bleu, nist


def coco_metrics(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """METEOR, ROUGE_L and CIDEr from pycocoevalcap on PTB-tokenized, lowercased text (needs Java)."""
    if shutil.which("java") is None:
        raise JavaMissing("the E2E metrics METEOR and the PTB tokenizer need Java: install a JRE "
                          "(e.g. apt-get install default-jre-headless) and put `java` on PATH")
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    meteor = Meteor()  # a Java process; its __del__ stops it
    meteor_score, _ = meteor.compute_score(gts, res)
    del meteor
    rouge_score, _ = Rouge().compute_score(gts, res)
    cider_score, _ = Cider().compute_score(gts, res)
    return {"METEOR": float(meteor_score), "ROUGE_L": float(rouge_score), "CIDEr": float(cider_score)}


def score(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """All five E2E metrics, keyed as the official script prints them."""
    bleu, nist = bleu_nist(references, hypotheses)
    return {"BLEU": bleu, "NIST": nist, **coco_metrics(references, hypotheses)}


def read_references(path: Path) -> list[list[str]]:
    """The official reference format: one reference a line, instances separated by blank lines."""
    instances: list[list[str]] = [[]]
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            instances[-1].append(line)
        elif instances[-1]:
            instances.append([])
    return [refs for refs in instances if refs]


def read_hypotheses(path: Path) -> list[str]:
    """One system output a line."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
