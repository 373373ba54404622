"""Exclusive locks on directories being written (a results run, an activation store).

A second writer fails fast with a clear message instead of interleaving with the first. The lock is
an ``flock`` on ``<dir>.lock``, so it is released by the OS when its holder dies, even on kill -9.
The holder's pid is written into it for that message, so the file changes whenever a process takes
the lock: the project's ``.dvcignore`` keeps runs' lock files out of what DVC hashes (summarize_set
depends on the whole ``results/{model.type}``, where they lie beside the runs).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtc.errors import LockedError


@contextmanager
def exclusive(directory: str | Path) -> Iterator[None]:
    directory = Path(directory)
    lock_path = directory.with_name(directory.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise LockedError(
                f"{directory}: another process (pid {holder}) is writing it; wait for it to finish or stop it"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
