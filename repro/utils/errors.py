"""Exceptions with messages that say what is wrong, where it was looked for, and the fix.

Every error that describes a problem with the user's input (a config value, a missing or corrupt
file, a busy run folder, a refused request) derives from :class:`UserError`; the command line
prints such an error as one ``repro: error:`` line, without a traceback. Each keeps a built-in base
too (``ValueError``, ``FileNotFoundError``, ...), so callers catching those still do.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["UserError", "MissingFileError", "OutputExistsError", "DatasetError", "RunBusyError"]


class UserError(Exception):
    """Base of every input error: the message says what is wrong and how to fix it."""


class MissingFileError(UserError, FileNotFoundError):
    """A required input file (weights, dataset file) does not exist.

    Args:
        what: what the file is, e.g. "DINO ViT-S/8 checkpoint".
        path: where it was looked for.
        fix: the command or step that provides it.
    """

    def __init__(self, what: str, path: str | Path, fix: str) -> None:
        self.what, self.path, self.fix = what, Path(path), fix
        super().__init__(f"{what} not found: {self.path}\n  fix: {fix}")


class OutputExistsError(UserError, FileExistsError):
    """An output that a step would write exists already and was not made by it (the message names what to remove)."""


class DatasetError(UserError, ValueError):
    """A dataset file exists but its content is wrong (shape, dtype, label values).

    The message always names the offending file(s).
    """


class RunBusyError(UserError, RuntimeError):
    """A run folder is locked by another live process (``repro run``/``repro eval`` of the same run).

    The message names the folder, the holder (``<pid>@<host>``) and what to do.
    """
