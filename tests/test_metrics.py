"""COCO caption metrics: hand-derived BLEU and CIDEr-D, pycocoevalcap parity, the Python PTB tokenizer."""

import logging
import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vlm_tune import metrics
from vlm_tune.metrics import python_ptb_tokenize, score_captions

needs_java = pytest.mark.skipif(not metrics.java_available(), reason="no Java runtime on this machine")

# Typical captions with the punctuation that trips tokenizers: commas, periods, apostrophes, hyphens,
# quotes, numbers, parentheses, possessives, curly quotes, dashes, odd spacing.
TYPICAL_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "a cat sitting on top of a laptop computer .",
    "A black and white photo of a man's face.",
    "It's a sunny day at the beach.",
    "A kid in a t-shirt plays with a frisbee.",
    'A sign that reads "STOP" at an intersection.',
    "A man in a suit (and tie) sitting at a desk.",
    "A 3.5 inch floppy disk next to a keyboard.",
    "The clock on the tower reads 10:30.",
    "A bowl of fruit: apples, oranges, and bananas.",
    "A dog that isn't on a leash runs across the grass.",
    "A train traveling down tracks next to a forest...",
    "A person on skis going down a snowy hill -- very fast.",
    "The 1,000 piece puzzle is on the table.",
    "A bus stop with a 'no parking' sign.",
    "People walking down a sidewalk in N.Y.C.",
    "The man can't catch the frisbee in time.",
    "Kids' toys scattered across the floor.",
    "They're eating lunch at an outdoor cafe.",
    "A 50-year-old man plays tennis.",
    "A person holding a hot dog with ketchup & mustard.",
    "A sign reading \u201cWelcome\u201d hangs over the door.",
    "The dog\u2019s owner throws a ball.",
    "A  man  standing   on a skateboard.",
    "a giraffe eating leaves from a tree  ",
    "Black/white photo of a train station.",
    "A woman wearing a hat [blurry] walks.",
    "A child's birthday party with balloons & cake!!",
    "Is this a dog or a cat?",
    "A street sign for 5th Ave. and Main St.",
    "Mr. Potato Head on a shelf; 10% off.",
    "A bathroom with a toilet, sink and mirror",
]


# ----------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------


@needs_java
def test_python_tokenizer_matches_java_ptb_tokenizer_on_typical_captions():
    java = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(TYPICAL_CAPTIONS)})
    for i, caption in enumerate(TYPICAL_CAPTIONS):
        assert python_ptb_tokenize(caption) == java[str(i)][0].split(), caption


def test_python_tokenizer_splits_like_ptb():
    # Contractions and possessives split off, hyphenated words and decimals stay whole, punctuation is
    # dropped, and brackets survive as -lrb-/-rrb- (pycocoevalcap's filter lists them in upper case).
    assert python_ptb_tokenize("A man's T-shirt (red), isn't it?") == [
        "a",
        "man",
        "'s",
        "t-shirt",
        "-lrb-",
        "red",
        "-rrb-",
        "is",
        "n't",
        "it",
    ]
    assert python_ptb_tokenize('He said "3.5 kg" -- I\'m sure.') == ["he", "said", "3.5", "kg", "i", "'m", "sure"]
    assert python_ptb_tokenize("Dr. Who vs. the U.S. team.") == ["dr.", "who", "vs.", "the", "u.s.", "team"]
    assert python_ptb_tokenize("a dog. a cat") == ["a", "dog", "a", "cat"]
    assert python_ptb_tokenize("") == []


# ----------------------------------------------------------------------------------------------
# BLEU and CIDEr-D worked out by hand on a tiny, already tokenized corpus.
# ----------------------------------------------------------------------------------------------

BLEU_PREDICTIONS = {"A": "the dog runs on the sand", "B": "two cats sleep"}
BLEU_REFERENCES = {
    "A": ["a dog runs on the grass", "the brown dog runs on sand"],
    "B": ["two cats sleep on a bed", "two cats sleeping now"],
}


def test_bleu_matches_hand_computation():
    # Clipped n-gram matches (count of each hypothesis n-gram capped by its max count in one reference):
    # A "the dog runs on the sand": 1-grams the x2 (refs hold at most 1) -> the, dog, runs, on, sand = 5/6
    #   2-grams: the dog x, dog runs v, runs on v, on the v, the sand x = 3/5
    #   3-grams: the dog runs x, dog runs on v, runs on the v, on the sand x = 2/4
    #   4-grams: the dog runs on x, dog runs on the v, runs on the sand x = 1/3
    # B "two cats sleep": 3/3, 2/2, 1/1, 0/0 (no 4-gram)
    # corpus: correct [8, 5, 3, 1] / guessed [9, 7, 5, 3]
    # lengths: hypotheses 6 + 3 = 9; closest reference lengths 6 (A) + 4 (B, |4-3| < |6-3|) = 10
    brevity = math.exp(1 - 10 / 9)
    precisions = [8 / 9, 5 / 7, 3 / 5, 1 / 3]
    expected = [brevity * math.prod(precisions[:n]) ** (1 / n) for n in range(1, 5)]

    scores = score_captions(BLEU_PREDICTIONS, BLEU_REFERENCES, use_java=False)
    direct, _ = Bleu(4).compute_score(BLEU_REFERENCES, {k: [v] for k, v in BLEU_PREDICTIONS.items()}, verbose=0)
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(expected[n - 1], rel=1e-6)
        assert scores[f"BLEU-{n}"] == pytest.approx(direct[n - 1], rel=1e-12)


def test_cider_d_matches_hand_computation():
    predictions = {"1": "a dog", "2": "the bird flies"}
    references = {"1": ["a dog", "a cat"], "2": ["a bird"]}
    # N = 2 images; idf(g) = log N - log max(1, df(g)), df = number of images whose references hold g.
    # "a" is in both images: idf 0. Every other n-gram (also unseen ones: "the", "flies") gets L = log 2.
    # Image 1, hypothesis "a dog": 1-gram vector {a: 0, dog: L}, 2-gram {a dog: L}.
    #   vs "a dog": cosine 1 for 1-grams and 2-grams; 3-, 4-grams empty -> 0. Same length: no penalty.
    #   vs "a cat": no shared weighted n-gram -> 0.   Score = 10 * mean_n(1+0, 1+0, 0, 0) / 2 refs = 2.5
    # Image 2, hypothesis "the bird flies": 1-grams {the: L, bird: L, flies: L} (norm sqrt(3) L),
    #   reference "a bird": {a: 0, bird: L} (norm L): cosine = L*L / (sqrt(3) L * L) = 1/sqrt(3); no shared
    #   2-gram. Lengths differ by one word: Gaussian penalty exp(-1^2 / (2 * 6^2)).
    #   Score = 10 * (1/sqrt(3)) * exp(-1/72) / 4 n-gram orders / 1 ref
    image_1 = 2.5
    image_2 = 10 * (1 / math.sqrt(3)) * math.exp(-1 / 72) / 4
    expected = (image_1 + image_2) / 2

    scores = score_captions(predictions, references, use_java=False)
    direct, _ = Cider().compute_score(references, {k: [v] for k, v in predictions.items()})
    assert scores["CIDEr-D"] == pytest.approx(expected, rel=1e-9)
    assert scores["CIDEr-D"] == pytest.approx(direct, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Parity with pycocoevalcap on raw captions, both tokenizer paths.
# ----------------------------------------------------------------------------------------------

RAW_PREDICTIONS = {
    "img1": "A man riding a wave on a surfboard.",
    "img2": "a cat laying on a laptop",
    "img3": "Two giraffes standing in a field.",
}
RAW_REFERENCES = {
    "img1": ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave!", "man's surfing, waves"],
    "img2": ["a cat sitting on top of a laptop computer .", "A cat lying on a keyboard."],
    "img3": ["Two giraffes standing next to each other in a field", "A pair of giraffes in the grass."],
}


def _direct_scores(gts: dict, res: dict) -> dict:
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        "BLEU-1": bleu[0],
        "BLEU-2": bleu[1],
        "BLEU-3": bleu[2],
        "BLEU-4": bleu[3],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr-D": Cider().compute_score(gts, res)[0],
    }


def test_scores_without_java_match_pycocoevalcap_and_skip_meteor(caplog):
    gts = {k: [" ".join(python_ptb_tokenize(r)) for r in refs] for k, refs in RAW_REFERENCES.items()}
    res = {k: [" ".join(python_ptb_tokenize(p))] for k, p in RAW_PREDICTIONS.items()}
    metrics._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="vlm_tune.metrics"):
        scores = score_captions(RAW_PREDICTIONS, RAW_REFERENCES, use_java=False)
    assert "METEOR" not in scores
    assert "METEOR skipped" in caplog.text
    assert scores == pytest.approx(_direct_scores(gts, res), rel=1e-12)
    assert 0 < scores["BLEU-4"] < scores["BLEU-1"] <= 1


@pytest.mark.slow  # two METEOR Java start-ups, ~15 s
@needs_java
def test_scores_with_java_match_the_coco_pipeline():
    from pycocoevalcap.meteor.meteor import Meteor

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in refs] for k, refs in RAW_REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": p}] for k, p in RAW_PREDICTIONS.items()})
    expected = _direct_scores(gts, res)
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]

    scores = score_captions(RAW_PREDICTIONS, RAW_REFERENCES, use_java=True)
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]
    assert scores == pytest.approx(expected, rel=1e-9)
    assert 0 < scores["METEOR"] < 1
    # Same tokens from both tokenizers on these captions, so the Java-free scores agree too.
    no_java = score_captions(RAW_PREDICTIONS, RAW_REFERENCES, use_java=False)
    assert no_java == pytest.approx({k: v for k, v in scores.items() if k != "METEOR"}, rel=1e-12)


@needs_java
def test_failing_java_tokenizer_falls_back_to_python(monkeypatch):
    def broken(self, captions):
        raise PermissionError("read-only pycocoevalcap folder")

    monkeypatch.setattr(PTBTokenizer, "tokenize", broken)
    scores = score_captions(RAW_PREDICTIONS, RAW_REFERENCES)
    assert scores == score_captions(RAW_PREDICTIONS, RAW_REFERENCES, use_java=False)
    with pytest.raises(PermissionError):
        score_captions(RAW_PREDICTIONS, RAW_REFERENCES, use_java=True)


def test_missing_java_is_detected_and_falls_back(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    metrics.java_available.cache_clear()
    try:
        assert metrics.java_available() is False
        assert "METEOR" not in score_captions(RAW_PREDICTIONS, RAW_REFERENCES)
        with pytest.raises(RuntimeError, match="no working `java`"):
            score_captions(RAW_PREDICTIONS, RAW_REFERENCES, use_java=True)
    finally:
        metrics.java_available.cache_clear()


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="no predictions"):
        score_captions({}, {}, use_java=False)
    with pytest.raises(ValueError, match=r"have no entry in references: 'x'"):
        score_captions({"x": "a dog"}, {"y": ["a dog"]}, use_java=False)
    with pytest.raises(ValueError, match=r"no non-empty reference caption: 'x'"):
        score_captions({"x": "a dog"}, {"x": ["", "  "]}, use_java=False)
    with pytest.raises(ValueError, match=r"have no prediction: 'y'"):
        score_captions({"x": "a dog"}, {"x": ["a dog"], "y": ["a cat"]}, use_java=False)
