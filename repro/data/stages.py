"""The resumable stage-folder protocol every data stage follows.

A stage writes one output folder (or file) under a temporary name, records its inputs and
parameters in ``index.json`` (``<file>.json`` beside a file output), and renames it when complete.
A rerun asks :func:`existing`: the output made with the same parameters is reused; one made with
other settings is an error naming it; one whose parameters differ only in content keys
(``*_sha256``: the same paths, other bytes) is removed and rebuilt. The stages of
:mod:`repro.data.pipeline`, :mod:`repro.data.image_depth` and :mod:`repro.data.features` use it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from repro.config.identity import content_mismatch
from repro.utils.errors import OutputExistsError

__all__ = ["INDEX", "read_params", "existing", "finish"]

INDEX = "index.json"
log = logging.getLogger("repro.data")


def read_params(index_path: str | Path) -> dict | None:
    """The ``params`` recorded in a stage's ``index.json``.

    Raises:
        FileExistsError: the file is not valid JSON or not a mapping (an interrupted copy, a hand edit);
            the message names it and the folder to remove.
    """
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise OutputExistsError(f"{index_path} is not valid JSON ({exc}); remove {index_path.parent} (or the output "
                              "it describes) to rebuild it") from None
    if not isinstance(index, dict):
        raise OutputExistsError(f"{index_path} holds a {type(index).__name__}, not a stage index; remove "
                              f"{index_path.parent} (or the output it describes) to rebuild it")
    return index.get("params")


def existing(out: Path, params: dict) -> bool:
    """True if ``out`` holds a complete output made with ``params``; stale output raises.

    An output whose params differ only in content keys (``*_sha256``: the same settings, other
    weights bytes at the same path) is removed, with one warning saying which, and built again.
    """
    index_path = out / INDEX if out.is_dir() else out.with_suffix(out.suffix + ".json")
    if not index_path.is_file():
        return False
    recorded = read_params(index_path)
    changed = content_mismatch(recorded, params)
    if changed:
        log.warning("%s was made from other input bytes (%s changed: the weights at the same path were replaced); "
                    "rebuilding it", out, ", ".join(changed))
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
            index_path.unlink()
        return False
    if recorded != params:
        raise OutputExistsError(
            f"{out} was made with other parameters ({recorded}); remove it or choose another output folder"
        )
    return True


def finish(partial: Path, out: Path, index: dict) -> Path:
    """Write ``index`` as the ``index.json`` of the complete folder ``partial`` and rename it to ``out``."""
    (partial / INDEX).write_text(json.dumps(index, sort_keys=True))
    os.replace(partial, out)
    return out
