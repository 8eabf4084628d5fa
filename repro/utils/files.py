"""Write files atomically: into a temporary file beside the target, then ``os.replace``.

Temporary names carry the writer's process id and host (``.<name>.<pid>@<host>.<random><suffix>``
for files, ``.<name>.partial-<pid>@<host>`` for folders), so that the next writer of the same
output can tell leftovers of a dead process (``kill -9``, node crash) from the work of a live
one: :func:`remove_stale` deletes those whose process no longer exists on this host. Leftovers
of other hosts are kept (their liveness cannot be checked from here).

Files are created with the permissions a plain ``open(path, "w")`` would give them: an existing
target keeps its mode, a new one gets ``0o666`` minus the process umask (``tempfile.mkstemp``
alone would force ``0o600`` and lock a team sharing ``$REPRO_WORK`` out of the results).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "owner_tag", "remove_stale", "current_umask", "pid_alive", "file_sha256",
           "cached_file_sha256", "content_sha256"]

_HOST = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"


def owner_tag() -> str:
    """``<pid>@<host>`` of this process, as used in temporary names (host: letters, digits, ``-``, ``_``)."""
    return f"{os.getpid()}@{_HOST}"


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows (Linux >= 4.7)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it the portable way, then put it back at once
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists on this host (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(folder: str | Path, name: str) -> list[Path]:
    """Delete the temporary files/folders of output ``name`` left in ``folder`` by dead processes.

    Matches the names :func:`atomic_path` and the ``.partial-<pid>@<host>`` folders of the
    stages create for ``name``; removes an entry only when its host is this host and its
    process id is not alive (and is not this process).

    Args:
        folder: the folder holding the output.
        name: the output's file or folder name (``metrics.json``, ``shards-train-224-five-sensor``).

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:partial-)?(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)(?:\..*)?$")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or match["host"] != _HOST:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)  # an existing file keeps its mode, as with open(path, "w")
    except OSError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    Readers never see a half-written file, and an interrupted write leaves the old file intact.
    Parent folders are created. ``suffix`` ends the temporary name (``np.savez`` needs ``.npz``).
    Leftover temporary files of ``path`` from dead processes are removed first
    (:func:`remove_stale`). The result has the permissions ``open(path, "w")`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}.", suffix=suffix)
    try:
        os.fchmod(fd, _mode_for(path))
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (``hashlib.file_digest``, read in blocks): what identifies a file.

    Raises:
        OSError: if the file cannot be read.
    """
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: str | Path) -> str:
    """:func:`file_sha256`, computed once per file in this process: cached by (resolved path, size, mtime).

    Rewriting the file (a weights swap at the same path) changes its size or modification time, so
    the digest is computed again. A file rewritten within one mtime tick to the same size would be
    missed; :func:`file_sha256` reads the bytes every time.

    Raises:
        OSError: if the file cannot be read.
    """
    resolved = Path(path).resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(resolved)
    return _SHA_CACHE[key]


def content_sha256(path: str | Path) -> str | None:
    """The content identity of a weights file or folder: hex sha256, or None if ``path`` does not exist.

    A file: :func:`cached_file_sha256`. A folder (e.g. a Hugging Face model folder): sha256 of the
    sorted ``"<relative path> <file sha256>"`` lines of every file below it.
    """
    path = Path(path)
    if path.is_file():
        return cached_file_sha256(path)
    if not path.is_dir():
        return None
    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    lines = [f"{p.relative_to(path).as_posix()} {cached_file_sha256(p)}" for p in files]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
