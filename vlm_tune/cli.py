"""What every command line shares: user mistakes end in one `error: ...` line and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from vlm_tune.errors import VlmTuneError


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors read like the toolkit's own: one `error: ...` line, exit code 2."""

    def error(self, message: str):
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        self.exit(2, f"error: {message} (usage: {usage})\n")


def run_command(command: Callable[[], int]) -> int:
    """Run a command's body; a `VlmTuneError` becomes one `error: ...` message on stderr and its exit code.

    Args:
        command: the body of a CLI's `main`, returning the exit code of a successful run.
    Returns:
        The exit code: the command's own, the error's `exit_code` (2 for user mistakes), or 130 on Ctrl-C.
    """
    try:
        return command()
    except VlmTuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the parts that handle it (loading, say): no traceback
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
