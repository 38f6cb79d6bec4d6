"""The error of the relevance modules: settings, model families or batches they cannot work with."""

from vlm_tune.errors import VlmTuneError


class RelevanceError(VlmTuneError, ValueError):
    """Relevance cannot run as asked (unsupported family, video input, truncated image tokens, bad weights)."""


class RelevanceWeightsMissing(RelevanceError, FileNotFoundError):
    """A folder without relevance weights (also a FileNotFoundError, for callers that catch that)."""
