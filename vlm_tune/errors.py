"""The base class of errors that reach the user as a message, not a traceback."""


class VlmTuneError(Exception):
    """An error caused by input (recipe, model folder, data, checkpoint); the CLIs print its message and exit."""
