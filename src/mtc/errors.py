"""The errors a user can cause: each ends a stage in one line on stderr and exit code 2.

One module, imported by every other and importing none, so that the stage runner can name them all
without importing the stages' code (and DVC's dependency lists stay what each stage really runs).
"""

from __future__ import annotations


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
    """A checkpoint that cannot be loaded as tensors."""


class BrowseError(RuntimeError):
    """Nothing to browse: no mined samples, or no tokenizer to show them with."""


USER_ERRORS = (ConfigError, StoreError, ModelError, DatasetError, LockedError, CheckpointError, FloatingPointError,
               BrowseError)
