"""The base class of errors that reach the user as a message, not a traceback."""


class VlmTuneError(Exception):
    """An error caused by input (recipe, model folder, data, checkpoint); the CLIs print its message and exit.

    `exit_code` is the command's exit status for this error: 2 (a user mistake) unless a subclass says otherwise.
    """

    exit_code = 2
