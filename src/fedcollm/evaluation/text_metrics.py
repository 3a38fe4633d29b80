"""The metrics of generated text, with no model and no torch: `exact_match` as lm-eval
computes it (its options `ignore_case`, `ignore_punctuation`, `ignore_numbers`,
`regexes_to_ignore`), ROUGE-1/2/L F1 by Google's `rouge-score` (with its Porter stemmer, as
the Self-Instruct evaluation), chrF++ and BLEU by sacrebleu.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence


def exact_match(
    prediction: str,
    reference: str,
    regexes_to_ignore: Sequence[str] = (),
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
) -> float:
    """1.0 if the two texts are equal after lm-eval's normalisations, in its order."""
    for pattern in regexes_to_ignore or ():
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for ignored, flag in (
        (string.punctuation, ignore_punctuation),
        (string.digits, ignore_numbers),
    ):
        if flag:
            table = str.maketrans("", "", ignored)
            prediction, reference = prediction.translate(table), reference.translate(table)
    # numpy, which lm-eval compares with, drops trailing NUL characters.
    return float(prediction.rstrip("\0") == reference.rstrip("\0"))


_ROUGE: dict[str, object] = {}


def rouge(prediction: str, references: Sequence[str], kind: str = "rougeL") -> float:
    """ROUGE F1 (`kind`: rouge1, rouge2, rougeL) of Google's rouge-score package, stemmed;
    against several references the best of them (its `score_multi`, SciTLDR's
    multi-target max)."""
    if kind not in _ROUGE:
        from rouge_score import rouge_scorer  # imported here: its NLTK load takes a moment

        _ROUGE[kind] = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    return _ROUGE[kind].score_multi(list(references), prediction)[kind].fmeasure


def chrf_scorer():
    """sacrebleu's chrF++ (character 6-grams and word bigrams), as FLORES-200 reports it."""
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=2)


def bleu_scorer():
    """sacrebleu's BLEU with its default 13a tokenisation."""
    from sacrebleu.metrics import BLEU

    return BLEU()


def sentence_scores(scorer, predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """Each generation's own score (0-100), what a paired test over examples compares."""
    return [
        scorer.sentence_score(p, list(r)).score
        for p, r in zip(predictions, references, strict=True)
    ]


def corpus_score(scorer, predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """The corpus score (0-100) the field reports: n-gram statistics summed over all
    sentences, not a mean of sentence scores. Rows with fewer references are padded with
    None, as sacrebleu takes them."""
    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    return scorer.corpus_score(list(predictions), streams).score
