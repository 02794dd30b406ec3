"""Progress on the console: a bar on a terminal, plain lines in a log (no Ray here).

Long work (an epoch, world generation, indexing, statistics, packing) shows a ``tqdm`` bar with its
rate and ETA when stderr is a terminal; when it is not (a log file, CI, ``ray job logs``) a bar
would only fill the log with carriage returns, so nothing is drawn and the work's own summary
lines (one per epoch, one per command) say what happened. ``XMODAL_PROGRESS=1`` / ``0`` forces
bars on or off.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def bars_enabled() -> bool:
    """Whether progress bars are drawn (stderr is a terminal, unless ``XMODAL_PROGRESS`` says)."""
    forced = os.environ.get("XMODAL_PROGRESS")
    if forced is not None:
        return forced not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items``, with a bar while they are consumed (see the module docstring)."""
    if not bars_enabled():
        yield from items
        return
    with tqdm(items, desc=description, total=total, unit=unit, leave=False, dynamic_ncols=True) as bar:
        yield from bar


class EpochBar:
    """The bar of the epoch being trained: batches done of the epoch's, tiles/s, ETA.

    One instance per console; :meth:`update` starts a new bar when the run or epoch changes, and
    :meth:`write` prints a line above the bar (the epoch's summary line closes it).
    """

    def __init__(self) -> None:
        self._bar: Any = None
        self._key: tuple[str, int] | None = None

    def update(self, run: str, epoch: int, epochs: int, step: int, steps: int, tiles_per_s: float) -> None:
        """Show ``step`` of ``steps`` batches of epoch ``epoch`` (1-based) of ``run``."""
        if not bars_enabled():
            return
        if self._key != (run, epoch):
            self.close()
            self._bar = tqdm(total=steps, desc=f"[{run}] epoch {epoch}/{epochs}", unit="batch", leave=False, dynamic_ncols=True)
            self._key = (run, epoch)
        self._bar.n = min(step, steps)
        self._bar.set_postfix_str(f"{tiles_per_s:.1f} tiles/s", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._key = None, None

    def write(self, line: str) -> None:
        """Print ``line`` (stdout) without breaking a bar; an epoch's summary line ends its bar."""
        self.close()
        print(line, flush=True)
