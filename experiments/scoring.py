"""Answer scoring for short-answer QA: exact match, contains and token F1.

Text is normalised as in the official SQuAD v1.1 evaluation script:
lower case, remove punctuation, remove the articles "a", "an" and "the", and
collapse whitespace. Two additions make golds from NQ-Open compare as their
readers expect: non-breaking and other Unicode spaces become plain spaces first, and
Unicode punctuation (curly quotes, dashes) is removed along with ASCII punctuation.

Every score of a prediction is the maximum over the item's accepted answers.
"""

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = set(string.punctuation)


def _is_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Normalise `text` for comparison (see the module docstring for the steps)."""
    # Unicode spaces (U+00A0, U+2009, ...) to plain spaces
    text = "".join(" " if char.isspace() else char for char in text)
    text = text.lower()
    text = "".join(char for char in text if not _is_punctuation(char))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    """Return whether the normalised prediction equals the normalised gold."""
    return normalize_answer(prediction) == normalize_answer(gold)


def contains_answer(prediction: str, gold: str) -> bool:
    """Return whether the normalised gold occurs in the normalised prediction on token boundaries.

    "paris" is found in "it is paris france" but not in "parisian". A gold that
    normalises to nothing (say, "The") never counts as contained.
    """
    gold_tokens = normalize_answer(gold).split()
    prediction_tokens = normalize_answer(prediction).split()
    if not gold_tokens:
        return False

    # slide the gold over the prediction, one token at a time
    width = len(gold_tokens)
    for start in range(len(prediction_tokens) - width + 1):
        if prediction_tokens[start : start + width] == gold_tokens:
            return True
    return False


def token_f1(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised texts, counting repeated tokens as in SQuAD.

    When either side has no tokens, F1 is 1.0 if both are empty and 0.0 otherwise.
    """
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)

    overlap = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class AnswerScore:
    """Scores of one prediction, each the maximum over the accepted answers."""

    em: bool
    contains: bool
    f1: float


def score_prediction(prediction: str, answers: Sequence[str]) -> AnswerScore:
    """Score `prediction` against every accepted answer and keep the best of each metric.

    The three maxima are taken independently, so `em` and `f1` may come from
    different accepted answers.
    """
    if not answers:
        raise ValueError("score_prediction needs at least one accepted answer, got an empty list")
    return AnswerScore(
        em=any(exact_match(prediction, gold) for gold in answers),
        contains=any(contains_answer(prediction, gold) for gold in answers),
        f1=max(token_f1(prediction, gold) for gold in answers),
    )
