"""Training progress: a tqdm bar on a terminal, plain log lines every N steps otherwise.

A bar redraws one line with carriage returns; written into a log file (stderr not a terminal: nohup,
`2> train.log`, a batch job) that becomes one enormous line. There, and with `--no-progress`, a line like
    step 20/220 (9%) | loss 1.2345 (mean of steps 11-20) | lr 2.0e-04 | 312 tok/s | 1:05 elapsed, 11:00 left
is written every `every` steps instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional


def lr_text(param_groups: list[dict]) -> str:
    """The learning rate of each parameter group: one value when all agree, else `language 2e-04, vision 2e-03`."""
    rates: dict[float, list[str]] = {}
    for group in param_groups:
        rates.setdefault(group["lr"], []).append(str(group.get("name", "group")))
    if len(rates) == 1:
        return f"{next(iter(rates)):.1e}"
    return ", ".join(f"{'+'.join(names)} {lr:.1e}" for lr, names in rates.items())


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class LineProgress:
    """Plain progress lines every `every` steps and at the last one (same calls as the tqdm bar used here).

    The `loss` field is taken as the mean over the steps since the previous line, and labelled so.
    """

    def __init__(self, total: int, initial: int, every: int, enabled: bool, stream=None):
        self.total, self.step, self.every, self.enabled = total, initial, max(every, 1), enabled
        self.stream = stream or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.started, self.first_step, self.last_line = time.perf_counter(), initial, initial

    def set_postfix(self, **fields: Any) -> None:
        self.postfix = fields

    def _field(self, name: str, value: Any) -> str:
        if name == "loss" and self.step - self.last_line > 1:
            return f"loss {value} (mean of steps {self.last_line + 1}-{self.step})"
        return f"{value} tok/s" if name == "tok_s" else f"{name} {value}"

    def update(self, n: int = 1) -> None:
        self.step += n
        if self.step % self.every == 0 or self.step == self.total:
            elapsed = time.perf_counter() - self.started
            left = elapsed / max(self.step - self.first_step, 1) * (self.total - self.step)
            fields = " | ".join(self._field(name, value) for name, value in self.postfix.items())
            percent = 100 * self.step // max(self.total, 1)
            clock = f"{_clock(elapsed)} elapsed, {_clock(left)} left"
            self.write(f"step {self.step}/{self.total} ({percent}%) | {fields} | {clock}")
            self.last_line = self.step

    def write(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """tqdm's bar, whose `write` stays quiet on the processes that draw no bar."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)

    def set_postfix(self, **fields: Any) -> None:
        self.bar.set_postfix(**fields, refresh=False)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def make_progress(total: int, initial: int, every: int, enabled: bool, bar: Optional[bool] = None):
    """A bar when `bar` (default: stderr is a terminal), else plain lines every `every` steps.

    Args:
        total, initial: optimizer steps in all, and done already (a resumed run).
        every: steps between two plain lines (train.log_every).
        enabled: False on the processes other than the main one (they draw nothing).
        bar: True / False forces the bar / plain lines; None picks by the terminal.
    """
    if bar is None:
        bar = sys.stderr.isatty()
    return BarProgress(total, initial, enabled) if bar else LineProgress(total, initial, every, enabled)
