"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D through pycocoevalcap's scorers.

Captions are tokenized the way the COCO caption evaluation does it: Stanford's PTBTokenizer
(lower-cased), then punctuation tokens are dropped. That tokenizer and METEOR run on Java; without
Java, `python_ptb_tokenize` gives the same tokens on caption text and METEOR is skipped with a warning.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
from typing import Optional

from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from vlm_tune.constants import METRIC_NAMES  # noqa: F401 (re-exported: the metric names, in order)
from vlm_tune.errors import VlmTuneError

logger = logging.getLogger("vlm_tune.metrics")


class MetricsError(VlmTuneError, ValueError):
    """Captions that cannot be scored as given (ids that do not match, images without a reference caption)."""


class JavaError(MetricsError, RuntimeError):
    """Java was required (eval.use_java: true) but is missing, or its tokenizer answered garbage."""


# ----------------------------------------------------------------------------------------------
# Java detection.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True when a working `java` is on PATH (checked once per process with `java -version`)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        result = subprocess.run([java, "-version"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _resolve_use_java(use_java: Optional[bool]) -> bool:
    if use_java is None:
        return java_available()
    if use_java and not java_available():
        raise JavaError(
            "use_java=True but no working `java` was found on PATH; install a Java runtime "
            "(e.g. `apt-get install default-jre-headless`) or set eval.use_java=null to fall back"
        )
    return bool(use_java)


# ----------------------------------------------------------------------------------------------
# Python version of the COCO tokenization (Stanford PTBTokenizer 3.4.1, -lowerCase, then
# pycocoevalcap's punctuation filter). Matches the Java tool on caption text; exotic inputs
# (URLs, emoticons, rare abbreviations) may differ.
# ----------------------------------------------------------------------------------------------

# Tokens pycocoevalcap removes after tokenizing. Its list spells brackets in upper case ("-LRB-") while
# the lower-cased tokenizer emits "-lrb-", so bracket tokens survive in the official scores too.
PTB_PUNCTUATION = frozenset(PUNCTUATIONS)

# Words whose trailing period the Java tokenizer keeps (titles, street/company abbreviations, months).
_ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr drs prof st mt ft jr sr vs etc inc corp co ltd ave blvd rd sgt capt gen col lt rev
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
""".split()
)

_CHARACTER_MAP = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",  # curly single quotes
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u2033": '"',  # curly double quotes
        "\u2013": " -- ",
        "\u2014": " -- ",
        "\u2015": " -- ",  # en and em dashes
        "\u2026": " ... ",
        "\u00bd": "1/2",
        "\u00bc": "1/4",
        "\u00be": "3/4",
        "\u20ac": "$",
        "\u00a3": "#",  # PTB3 currency normalization
    }
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")  # emoji etc.: the Java lexer drops them as untokenizable
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'d|'ll|'m)$", re.IGNORECASE)
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}

_WHITESPACE = re.compile(r"\s*")
# One alternative per token kind, tried in order at each position of the text.
_TOKEN = re.compile(
    r"""
    (?P<ellipsis>\.{3,})
  | (?P<dashes>--+)
  | (?P<marks>[?!]+)
  | (?P<email>\w[\w.+-]*@\w+(?:\.\w+)+)
  | (?P<handle>[@#][^\W\d_]\w*)
  | (?P<acronym_amp>[A-Z]+&[A-Z]+\b)
  | (?P<tag><[A-Za-z/][^<>\s]*>)
  | (?P<number>[-+]?(?:\d++(?:[.,:/]\d++)*+|\.\d++)(?![\w'-]))
  | (?P<quoted_year>'(?:\d0s|em)\b)
  | (?P<quoted_n>'n')
  | (?P<y_apostrophe>[yY]'(?=(?:all|know)\b))
  | (?P<word>\w+(?:(?:[-./]|'(?!n'))\w+)*)
  | (?P<other>\S)
""",
    re.VERBOSE,
)


def _split_contractions(word: str) -> list[str]:
    """`couldn't've` -> could n't 've; `man's` -> man 's; `o'clock` stays whole."""
    tail: list[str] = []
    while True:
        match = _CONTRACTION.match(word)
        if match is None:
            break
        word, suffix = match.group(1), match.group(2)
        tail.insert(0, suffix)
    return [word, *tail]


def _keeps_period(word: str, after: str) -> bool:
    """Whether the Java tokenizer keeps the `.` that follows `word` (`after`: the text past the period)."""
    lowered = word.lower()
    if len(word) == 1 and word.isalpha():
        return True  # "a." "b." initials
    pieces = lowered.split(".")
    if len(pieces) > 1 and all(len(p) == 1 and p.isalpha() for p in pieces):
        return True  # acronyms: u.s. e.g. a.m.
    if lowered in _ABBREVIATIONS or lowered == "ph.d":
        return True
    return lowered == "no" and after.lstrip()[:1].isdigit()  # "no. 5"


def _lex(text: str) -> list[str]:
    """PTB tokens of one line, before lower-casing and punctuation removal."""
    tokens: list[str] = []
    position = _WHITESPACE.match(text).end()
    while position < len(text):
        match = _TOKEN.match(text, position)
        kind, token = match.lastgroup, match.group()
        position = match.end()
        if kind == "ellipsis":
            tokens.append("...")
        elif kind == "dashes":
            tokens.append("--")
        elif kind == "word":
            if (
                text.startswith(".", position)
                and not text.startswith("...", position)
                and _keeps_period(token, text[position + 1 :])
            ):
                token += "."
                position += 1
            if token.lower() in _SPLIT_WORDS:
                tokens.extend(_SPLIT_WORDS[token.lower()])
            else:
                tokens.extend(_split_contractions(token))
        elif kind == "other":
            if token == '"':
                tokens.append("''")
            elif token == "'" and re.match(r"t(?:is|was)\b", text[position:], re.IGNORECASE):
                tokens.append("'t")  # 'tis -> 't is
                position += 1
            else:
                tokens.append(_BRACKETS.get(token, token))
        else:
            tokens.append(token)
        position = _WHITESPACE.match(text, position).end()
    return tokens


def python_ptb_tokenize(caption: str) -> list[str]:
    """Tokenize one caption like pycocoevalcap's PTBTokenizer, without Java.

    Args:
        caption: raw caption text.
    Returns:
        Lower-cased tokens with pycocoevalcap's punctuation tokens removed.
    """
    # Own code: no Python package reproduces Stanford PTBTokenizer's output (tests/test_metrics.py checks it).
    tokens = _lex(_ASTRAL.sub(" ", caption.translate(_CHARACTER_MAP)))
    return [token.lower() for token in tokens if token.lower() not in PTB_PUNCTUATION]


# ----------------------------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------------------------


def tokenize_captions(captions: dict[str, list[str]], use_java: bool) -> dict[str, list[str]]:
    """COCO tokenization of every caption: image id -> captions as space-joined tokens.

    Args:
        captions: image id -> raw captions.
        use_java: run pycocoevalcap's PTBTokenizer (Java); False uses `python_ptb_tokenize`.
    """
    if not use_java:
        return {image_id: [" ".join(python_ptb_tokenize(c)) for c in texts] for image_id, texts in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The Java tool keeps one output line per input line: every line break inside a caption must go.
    one_line = {image_id: [{"caption": " ".join(c.split())} for c in texts] for image_id, texts in captions.items()}
    tokenized = PTBTokenizer().tokenize(one_line)
    if {k: len(v) for k, v in tokenized.items()} != {k: len(v) for k, v in captions.items()}:
        raise JavaError(
            "pycocoevalcap's PTBTokenizer returned a different number of captions than it was "
            "given; score with use_java=False (eval.use_java=false) to use the Python tokenizer"
        )
    return tokenized


def _check_inputs(predictions: dict[str, str], references: dict[str, list[str]]) -> None:
    def listed(ids: list) -> str:
        return ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

    if not predictions:
        raise MetricsError("score_captions: no predictions to score")
    unreferenced = [i for i in predictions if i not in references]
    if unreferenced:
        raise MetricsError(
            f"score_captions: {len(unreferenced)} predicted image(s) have no entry in references: "
            f"{listed(unreferenced)}; pass references for every predicted image"
        )
    unpredicted = [i for i in references if i not in predictions]
    if unpredicted:
        raise MetricsError(
            f"score_captions: {len(unpredicted)} referenced image(s) have no prediction: "
            f"{listed(unpredicted)}; drop them from references or predict them"
        )
    empty = [i for i, refs in references.items() if not any(isinstance(r, str) and r.strip() for r in refs)]
    if empty:
        raise MetricsError(
            f"score_captions: {len(empty)} image(s) have no non-empty reference caption: "
            f"{listed(empty)}; captions metrics need at least one reference per image"
        )
    not_text = [i for i, p in predictions.items() if not isinstance(p, str)]
    if not_text:
        raise MetricsError(f"score_captions: predictions must be strings; not for image(s) {listed(not_text)}")


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> Optional[float]:
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(gts, res)
        del scorer  # stops its Java process
        return float(score)
    except (OSError, ValueError) as exc:  # the Java process died or answered garbage
        logger.warning("METEOR failed (%s: %s); reporting the other metrics without it", type(exc).__name__, exc)
        return None


def score_captions(
    predictions: dict[str, str], references: dict[str, list[str]], use_java: Optional[bool] = None
) -> dict[str, float]:
    """COCO caption metrics of predicted captions against all references of each image.

    Args:
        predictions: image id -> predicted caption.
        references: image id -> reference captions (same ids as `predictions`).
        use_java: None detects Java; True requires it; False uses the Python tokenizer and skips METEOR.
    Returns:
        {"BLEU-1".."BLEU-4", "METEOR" (only with Java), "ROUGE-L", "CIDEr-D"} as pycocoevalcap computes them
        (BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr-D on its usual 0-10 scale).
    Raises:
        MetricsError: ids of predictions and references differ, or an image has no reference caption.
        JavaError: use_java=True without a working Java.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_inputs(predictions, references)
    java = _resolve_use_java(use_java)
    ids = list(predictions)
    refs = {i: [r for r in references[i] if isinstance(r, str) and r.strip()] for i in ids}
    try:
        gts, res = tokenize_captions(refs, java), tokenize_captions({i: [predictions[i]] for i in ids}, java)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:  # JavaError, a read-only pycocoevalcap folder
        if use_java:
            raise
        logger.warning("Java PTB tokenizer failed (%s); using the Python tokenizer and skipping METEOR", exc)
        java = False
        gts, res = tokenize_captions(refs, False), tokenize_captions({i: [predictions[i]] for i in ids}, False)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = {f"BLEU-{n}": float(value) for n, value in enumerate(bleu, start=1)}
    if java:
        meteor = _meteor(gts, res)
        if meteor is not None:
            metrics["METEOR"] = meteor
    else:
        _warn_once(
            "Java not used: METEOR skipped (install a Java runtime to get it); "
            "captions tokenized with the Python PTB tokenizer"
        )
    metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    # pycocoevalcap's `Cider` is CIDEr-D: tf-idf n-grams (n=1..4) with clipped counts and a Gaussian length
    # penalty (sigma=6), x10; document frequencies come from the references of the images scored here.
    metrics["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    return metrics
