"""Ctrl-C (SIGINT) during training: stop at a point whose state can be saved, never inside an update or a save.

While `catch_interrupts()` is active, SIGINT raises KeyboardInterrupt at once, except inside a `deferred()`
section (an optimizer update together with the position it leads to, a checkpoint save): there it is noted
and raised when the section ends. Within `shielded()` (the save on the way out) it is only noted, so a second
Ctrl-C waits for that save. With several processes every SIGINT is only noted, and `agreed_interrupt` lets
all processes stop at the same step boundary, so none is left waiting in a collective.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"active": False, "immediate": True, "depth": 0, "shielded": False, "pending": False}


def _on_sigint(signum, frame) -> None:
    if _state["immediate"] and _state["depth"] == 0 and not _state["shielded"]:
        raise KeyboardInterrupt
    if not _state["pending"] or _state["shielded"]:
        if _state["shielded"]:
            what = "the checkpoint is being written; exiting right after it"
        elif _state["immediate"]:
            what = "finishing the update or save; stopping right after it"
        else:
            what = "every process stops after this step"
        print(f"\nCtrl-C: {what}", file=sys.stderr, flush=True)
    _state["pending"] = True


@contextmanager
def catch_interrupts(immediate: bool = True) -> Iterator[None]:
    """Handle SIGINT as the module docstring says, for the duration of the block (main thread only;
    elsewhere the block runs with Python's default handling)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _state.update(active=True, immediate=immediate, depth=0, shielded=False, pending=False)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _state.update(active=False, pending=False)


@contextmanager
def deferred() -> Iterator[None]:
    """A section that Ctrl-C never cuts: a SIGINT inside it is raised as KeyboardInterrupt when it ends."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    ready = _state["active"] and _state["immediate"] and _state["depth"] == 0 and not _state["shielded"]
    if ready and _state["pending"]:
        _state["pending"] = False
        raise KeyboardInterrupt


@contextmanager
def shielded() -> Iterator[None]:
    """The save on the way out: further SIGINTs are noted and ignored until the block ends."""
    _state["shielded"] = True
    try:
        yield
    finally:
        _state.update(shielded=False, pending=False)


def agreed_interrupt(accelerator) -> bool:
    """With several processes: True on every process once any of them got a SIGINT (one collective).
    With one process, a SIGINT has been raised already, so this is False."""
    if _state["immediate"] or accelerator.num_processes == 1:
        return False
    import torch

    flag = torch.tensor(float(_state["pending"]), device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item())
