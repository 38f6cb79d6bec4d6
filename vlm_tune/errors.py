"""The base class of errors that reach the user as a message, not a traceback; the words for a failed write."""

import errno


class VlmTuneError(Exception):
    """An error caused by input (recipe, model folder, data, checkpoint); the CLIs print its message and exit.

    `exit_code` is the command's exit status for this error: 2 (a user mistake) unless a subclass says otherwise.
    """

    exit_code = 2


def disk_error(exc: OSError) -> str:
    """Why a write failed, in words (a full disk is named as such)."""
    if exc.errno == errno.ENOSPC:
        return "the disk is full (no space left on device); free space or choose another train.output_dir"
    return exc.strerror or str(exc)
