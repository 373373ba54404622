"""The errors a user can cause: each ends a stage in one line on stderr and exit code 2.

One module, imported by every other and importing none, so that the stage runner can name them all
without importing the stages' code (and DVC's dependency lists stay what each stage really runs).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ConfigError(ValueError):
    """A bad value in the configuration; the message names the key, the value and the fix."""


class StoreError(RuntimeError):
    """A missing, incomplete or mismatched activation store."""


class ModelError(RuntimeError):
    """A model cannot be found, loaded or asked for a site it does not have."""


class DatasetError(RuntimeError):
    """A dataset that cannot be read, or holds too little text."""


class LockedError(RuntimeError):
    """Another process is writing the same directory."""


class CheckpointError(RuntimeError):
    """A checkpoint or run-directory file that is missing or cannot be read (truncated, damaged, or
    not tensors only); the message names the file and what to run."""


class BrowseError(RuntimeError):
    """Nothing to browse: no mined samples, or no tokenizer to show them with."""


USER_ERRORS = (
    ConfigError,
    StoreError,
    ModelError,
    DatasetError,
    LockedError,
    CheckpointError,
    FloatingPointError,
    BrowseError,
)


def disk_full_message(e: OSError) -> str | None:
    """One line for a full disk or quota (None for other OS errors, which are bugs to show whole)."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return (
        f"no space left on the device writing {e.filename or 'a file'}; finished stores, checkpoints "
        "and results are intact (every file is written whole, then renamed): free space and re-run; "
        "training resumes from its last checkpoint, extraction from its last whole chunk"
    )


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


@contextmanager
def one_line_exit(say: Callable[[str], None] = _to_stderr) -> Iterator[None]:
    """Turn a user error (or a full disk) inside the block into ``error: ...`` and exit code 2; the
    one place the stage scripts and the ``mtc`` command map errors to exit codes."""
    try:
        yield
    except USER_ERRORS as e:
        say(f"error: {e}")
        raise SystemExit(2) from None
    except OSError as e:
        if (message := disk_full_message(e)) is None:
            raise
        say(f"error: {message}")
        raise SystemExit(2) from None


def in_brief(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it), for a one-line error."""
    first = next(iter(str(e).splitlines()), "")
    return f"{type(e).__name__}: {first[:limit]}" if first else type(e).__name__
