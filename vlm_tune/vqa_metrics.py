"""Answer metrics for question answering: exact match, VQA accuracy and ANLS, each in [0, 1].

- exact match: the prediction equals one reference after `normalize_answer` (lower case, no punctuation,
  no articles a/an/the, single spaces).
- VQA accuracy: the VQA benchmark's metric. Answers are normalised as its evaluation script does
  (`vqa_normalize`: punctuation, number words to digits, articles, part of its contractions table; applied to
  every answer, where the script skips it when all references agree); a prediction matching
  m of the other references scores min(1, m / 3), averaged over leaving out each reference in turn (with
  10 references: the official score). With a single reference it is exact match under that normalisation.
- ANLS (average normalised Levenshtein similarity, DocVQA / ST-VQA): 1 - edit distance / longer length on
  lower-cased, whitespace-normalised text, 0 when that distance is 0.5 or more; the best reference counts.
"""

from __future__ import annotations

import re

ANLS_THRESHOLD = 0.5
VQA_MATCHES_FOR_FULL_CREDIT = 3

_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[^\w\s]")

# The VQA evaluation script's tables (vqaEval.py): number words, articles, contractions without apostrophe.
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hes": "he's",
    "isnt": "isn't",
    "its": "it's",
    "shouldnt": "shouldn't",
    "thats": "that's",
    "theres": "there's",
    "theyre": "they're",
    "wasnt": "wasn't",
    "werent": "weren't",
    "whats": "what's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "youre": "you're",
}
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # its list: "'" and ":" are kept, "." is handled apart
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (exact match)."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_normalize(text: str) -> str:
    """An answer as the VQA evaluation script compares it."""
    original = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = original
    for mark in _VQA_PUNCTUATION:  # next to a space (in the original) a mark goes, else it becomes a space
        if (mark + " " in original or " " + mark in original) or _COMMA_IN_NUMBER.search(original) is not None:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """The VQA benchmark's accuracy of one prediction against its references (see the module docstring)."""
    predicted = vqa_normalize(prediction)
    answers = [vqa_normalize(r) for r in references]
    if len(answers) == 1:
        return float(predicted == answers[0])
    scores = []
    for left_out in range(len(answers)):
        matches = sum(a == predicted for i, a in enumerate(answers) if i != left_out)
        scores.append(min(1.0, matches / VQA_MATCHES_FOR_FULL_CREDIT))
    return sum(scores) / len(scores)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character)."""
    # Own code: answers are short, and a dynamic programme of a few lines beats adding a dependency for it.
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Normalised Levenshtein similarity of one prediction to its closest reference (0 below the threshold)."""

    def clean(text: str) -> str:
        return " ".join(text.strip().lower().split())

    best = 0.0
    for reference in references:
        a, b = clean(prediction), clean(reference)
        distance = levenshtein(a, b) / max(len(a), len(b), 1)
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def score_answers(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Mean exact match, VQA accuracy and ANLS over all questions.

    Args:
        predictions: question id -> predicted answer.
        references: question id -> its reference answers (same ids as `predictions`).
    Raises:
        ValueError: no predictions, ids that differ, or a question without a reference answer.
    """
    if not predictions:
        raise ValueError("score_answers: no predictions to score")
    if set(predictions) != set(references):
        different = sorted(set(predictions) ^ set(references))[:5]
        raise ValueError(f"score_answers: predictions and references name different questions, e.g. {different}")
    empty = [i for i, refs in references.items() if not any(r.strip() for r in refs)]
    if empty:
        raise ValueError(f"score_answers: questions without a reference answer: {empty[:5]}")
    totals = {"exact_match": 0.0, "vqa_accuracy": 0.0, "anls": 0.0}
    for question, prediction in predictions.items():
        refs = [r for r in references[question] if r.strip()]
        totals["exact_match"] += float(normalize_answer(prediction) in {normalize_answer(r) for r in refs})
        totals["vqa_accuracy"] += vqa_accuracy(prediction, refs)
        totals["anls"] += anls(prediction, refs)
    return {name: value / len(predictions) for name, value in totals.items()}
