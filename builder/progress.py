"""Live progress of a build on a terminal: one line per stage with a spinner and its running
time, redrawn several times a second, so no stage is silent for more than a moment.

Drawn with rich on stderr, and only when stderr is a terminal and the caller did not turn
it off (-q, --json); otherwise every method is a no-op and nothing extra is printed.
Stage names are the keys of BuildResult.stages; LABELS says what the user sees.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

LABELS = {
    "recipe": "read the recipe, check the layout",
    "resolve": "resolve and index (Debian archive)",
    "download": "download",
    "extract": "extract packages",
    "module scan": "module scan",
    "initramfs": "initramfs",
    "rootfs": "root file system",
    "loader": "boot loader",
    "plan": "plan the layout",
    "assembly": "assemble the image",
    "self-check": "self-check",
    "outputs": "write outputs",
    "export": "export pinned packages",
}
REFRESH_PER_SECOND = 8


class BuildProgress:
    def __init__(self, enabled: Optional[bool] = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        self._tasks: Dict[str, int] = {}
        self._spent: Dict[str, float] = {}
        self._since: Dict[str, float] = {}
        self._stack: List[str] = []

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "BuildProgress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn
            self._progress = Progress(SpinnerColumn(finished_text="[green]✓"),
                                      TextColumn("{task.description}"), _StageTime(self),
                                      console=Console(stderr=True), transient=True,
                                      refresh_per_second=REFRESH_PER_SECOND)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- stages ----------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.leave(name)

    def enter(self, name: str) -> None:
        self._stack.append(name)
        if self._progress is None:
            return
        if self._stack.count(name) > 1:
            return
        self._since[name] = time.monotonic()
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(LABELS.get(name, name), total=1)
        self._progress.update(self._tasks[name], completed=0)

    def leave(self, name: str) -> None:
        if name in self._stack:
            self._stack.reverse()
            self._stack.remove(name)
            self._stack.reverse()
        if self._progress is None or name in self._stack:
            return
        self._spent[name] = self.seconds(name)
        self._since.pop(name, None)
        self._progress.update(self._tasks[name], completed=1)

    def seconds(self, name: str) -> float:
        running = time.monotonic() - self._since[name] if name in self._since else 0.0
        return self._spent.get(name, 0.0) + running

    def warn(self, text: str, fallback=None) -> None:
        """A warning now: above the live display, else through `fallback` (the CLI's)."""
        if self._progress is not None:
            self._progress.console.print(f"armvm-build: warning: {text}", markup=False, highlight=False)
        elif fallback is not None:
            fallback(text)


def _StageTime(owner: BuildProgress):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class StageTime(ProgressColumn):
        def render(self, task):
            name = next((n for n, t in owner._tasks.items() if t == task.id), None)
            return Text(f"{owner.seconds(name):5.1f} s" if name else "", style="cyan")

    return StageTime()
