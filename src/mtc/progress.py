"""Rich progress bars for long work (quiet when output is not a terminal and MTC_QUIET is set)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def bar(description: str, total: int, unit: str = "") -> Iterator[Callable[..., None]]:
    """``with bar("train", total=n) as advance: advance(1, loss=0.3)``."""
    if os.environ.get("MTC_QUIET"):
        yield lambda n=1, **info: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, transient=False) as p:
        task = p.add_task(description, total=total, info="")

        def advance(n: int = 1, **info: float) -> None:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            p.update(task, advance=n, **({"info": text} if info else {}))

        yield advance


def note(message: str) -> None:
    """One line of information on stderr (quiet under MTC_QUIET, like the bars)."""
    if not os.environ.get("MTC_QUIET"):
        import sys

        print(message, file=sys.stderr)
