"""VQA answer metrics against values worked out by hand."""

import pytest

from vlm_tune.vqa_metrics import anls, levenshtein, normalize_answer, score_answers, vqa_accuracy, vqa_normalize


def test_exact_match_normalisation_drops_case_punctuation_and_articles():
    assert normalize_answer("The  Red, circle!") == "red circle"
    assert normalize_answer("An apple.") == "apple"


def test_vqa_normalisation_follows_the_benchmark_script():
    assert vqa_normalize("Two dogs.") == "2 dogs"  # number word -> digit, final period dropped
    assert vqa_normalize("x-ray") == "x ray"  # a mark inside a word becomes a space
    assert vqa_normalize("yes, sir") == "yes sir"  # a mark next to a space goes
    assert vqa_normalize("1,000") == "1000"  # commas inside numbers go
    assert vqa_normalize("3.5") == "3.5"  # a decimal point stays
    assert vqa_normalize("the dont") == "don't"  # article dropped, contraction restored


def test_vqa_accuracy_is_min_of_matches_over_three_averaged_over_leaving_one_out():
    # 3 of 10 annotators said "2": leaving out one of those 3 leaves 2 matches (2/3), leaving out one
    # of the other 7 leaves 3 (1.0): (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)  # 4 or more: always 3 left
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    assert vqa_accuracy("A dog.", ["dog"]) == 1.0  # one reference: exact match after normalisation


def test_anls_is_one_minus_normalised_edit_distance_with_a_threshold():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert anls("hello", ["hallo"]) == pytest.approx(0.8)  # 1 edit in 5 characters
    assert anls("Hello ", ["hello"]) == 1.0  # case and outer spaces do not count
    assert anls("abc", ["xyz"]) == 0.0  # distance 1.0 >= 0.5
    assert anls("abcd", ["abxy"]) == 0.0  # distance exactly 0.5: cut to 0
    assert anls("abcde", ["abxye", "zzzzz"]) == pytest.approx(0.6)  # the best reference counts


def test_score_answers_averages_over_questions_and_checks_ids():
    scores = score_answers({"q1": "red", "q2": "on the left"}, {"q1": ["Red"], "q2": ["left", "on the left"]})
    # q1: all three 1.0; q2: exact 1.0, VQA accuracy: leaving out "on the left" leaves no match -> 0, leaving
    # out "left" leaves one -> 1/3: mean 1/6; ANLS 1.0
    assert scores == pytest.approx({"exact_match": 1.0, "vqa_accuracy": (1 + 1 / 6) / 2, "anls": 1.0})
    with pytest.raises(ValueError, match="different questions"):
        score_answers({"q1": "red"}, {"q2": ["red"]})
    with pytest.raises(ValueError, match="without a reference"):
        score_answers({"q1": "red"}, {"q1": [" "]})
