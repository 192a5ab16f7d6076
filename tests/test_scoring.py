"""Scoring: SQuAD normalisation, exact match, contains and token F1, on golds with punctuation and NBSPs."""

import pytest

from experiments.scoring import contains_answer, exact_match, normalize_answer, score_prediction, token_f1

NBSP = "\u00a0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("The Eiffel Tower!", "eiffel tower"),
        ("an apple a day", "apple day"),
        (f"54{NBSP}Mbit/s", "54 mbits"),
        (f"January{NBSP}31,{NBSP}2018", "january 31 2018"),
        ("U.S.A.", "usa"),
        ("\u201cHey Jude\u201d \u2013 The Beatles", "hey jude beatles"),
        ("  many   spaces\tand\nlines ", "many spaces and lines"),
        ("Theatre", "theatre"),  # "the" only goes as a whole word
        ("The", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_articles_and_nbsp():
    assert exact_match("54 Mbit/s", f"54{NBSP}Mbit/s")
    assert exact_match("the Pacific Ocean.", "Pacific Ocean")
    assert not exact_match("Pacific", "Pacific Ocean")


def test_contains_on_token_boundaries():
    assert contains_answer("The capital of France is Paris.", "Paris")
    assert contains_answer("It resumed on January 31 2018, after the break.", f"January{NBSP}31,{NBSP}2018")
    assert not contains_answer("A Parisian café.", "Paris")
    assert not contains_answer("January 2018", f"January{NBSP}31,{NBSP}2018")


def test_contains_rejects_gold_that_normalises_to_nothing():
    assert not contains_answer("the end", "The")


def test_token_f1_exact_values():
    # prediction tokens [nile, river, in, egypt], gold [nile, river]: P = 1/2, R = 1
    assert token_f1("The Nile River, in Egypt.", "Nile River") == pytest.approx(2 / 3)
    assert token_f1("Nile", "River Nile") == pytest.approx(2 / 3)
    assert token_f1("Paris", "Paris!") == 1.0
    assert token_f1("London", "Paris") == 0.0


def test_token_f1_counts_repeated_tokens_once_each():
    # overlap of [new, york, new, york] with [new, york] is 2 tokens: P = 1/2, R = 1
    assert token_f1("New York New York", "New York") == pytest.approx(2 / 3)


def test_token_f1_of_empty_texts():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "Paris") == 0.0


def test_score_prediction_takes_max_over_answers():
    score = score_prediction("Shakespeare", ["William Shakespeare", "Shakespeare"])
    assert score.em is True
    assert score.contains is True
    assert score.f1 == 1.0


def test_score_prediction_metrics_from_different_answers():
    # 6 prediction tokens; F1 is best against "Jane Austen" (P = 2/6, R = 1), not "Austen" (2/7)
    score = score_prediction("It was written by Jane Austen.", ["Jane Austen", "Austen"])
    assert score.em is False
    assert score.contains is True
    assert score.f1 == pytest.approx(0.5)


def test_score_prediction_with_nbsp_gold():
    score = score_prediction("54 Mbit/s", ["54" + NBSP + "Mbit/s"])
    assert score.em is True
    assert score.contains is True
    assert score.f1 == 1.0


def test_score_prediction_rejects_empty_answers():
    with pytest.raises(ValueError, match="at least one accepted answer"):
        score_prediction("Paris", [])
