"""Exceptions with messages that say what is wrong, where it was looked for, and the fix."""

from __future__ import annotations

from pathlib import Path

__all__ = ["MissingFileError", "RunBusyError"]


class MissingFileError(FileNotFoundError):
    """A required input file (weights, dataset file) does not exist.

    Args:
        what: what the file is, e.g. "DINO ViT-S/8 checkpoint".
        path: where it was looked for.
        fix: the command or step that provides it.
    """

    def __init__(self, what: str, path: str | Path, fix: str) -> None:
        self.what, self.path, self.fix = what, Path(path), fix
        super().__init__(f"{what} not found: {self.path}\n  fix: {fix}")


class RunBusyError(RuntimeError):
    """A run folder is locked by another live process (``repro run``/``repro eval`` of the same run).

    The message names the folder, the holder (``<pid>@<host>``) and what to do.
    """
