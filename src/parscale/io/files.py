"""Writing files and folders so that nothing is ever half-written and nothing of the user's is deleted.

- `atomic_write(path, data)` / `write_json_atomic(obj, path)`: a temporary file in the same folder,
  then one rename.
- `temporary_folder(target)` / `publish_folder(tmp, target, writes, overwrite)`: write a folder under a
  temporary name beside the target, then put it in place under the ownership rule of ownership.py:
  parscale removes or replaces only what it can prove it wrote (the folder's `.parscale-owned.json`);
  a target holding anything is refused unless `overwrite=True`, which replaces parscale's own entries
  and never a file it did not write. A symbolic link at the target is written through, never replaced.
  An exception between the two renames of a swap puts the old folder back.
- `RunLock`: an exclusive lock on a run folder, so two processes never write one run.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

from parscale.io.ownership import (
    MARKER,
    FolderInUseError,
    add_entries,
    describe,
    foreign_entries,
    is_owned,
    mark_temporary,
    read_marker,
    record_all,
    remove_owned,
    sweep_stale,
    temporary_name_prefix,
)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_permissions(path, folder: bool = False) -> None:
    """Give a file or folder made by tempfile (0600 / 0700) the permissions the user's umask asks for,
    as open() and mkdir() would have."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def new_temporary_folder(prefix: str, parent: Path) -> Path:
    """An empty folder under parent with the user's permissions (see user_permissions)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    user_permissions(tmp, folder=True)
    return tmp


def atomic_write(path, data) -> None:
    """Write a file through a temporary name in the same folder, then rename it into place.

    data: bytes, or an iterable of bytes-like parts written one after another (no joined copy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        user_permissions(tmp)
        with os.fdopen(fd, "wb") as fh:
            for part in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                fh.write(part)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_file(path) -> None:
    """Raise now (before long work) if a result file could not be written at path."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {str(path)!r} is a folder, not a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # atomic_write creates the missing folders under the first existing one
    if not parent.is_dir():
        raise NotADirectoryError(f"output {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"output {str(path)!r} cannot be written (no write permission)")


def write_json_atomic(obj, path) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def real_target(target) -> Path:
    """The folder a write goes to: target itself, or the folder a symbolic link at target points to
    (a link is written through, never replaced)."""
    target = Path(target)
    if target.is_symlink():
        real = target.resolve()
        if not real.is_dir():
            raise FolderInUseError(f"{str(target)!r} is a link to {str(real)!r}, which is not a folder; "
                                   f"choose another folder")
        return real
    return target


def temporary_folder(target: Path) -> Path:
    """A new empty folder beside target (same file system, so it can be renamed into place), marked as
    parscale's; stale ones a killed process left for this target are swept first (ownership.sweep_stale)."""
    target = real_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp = new_temporary_folder(temporary_name_prefix(target, "tmp"), target.parent)
    mark_temporary(tmp)
    return tmp


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != MARKER)


def check_writable(target, writes=(), overwrite: bool = False) -> Path:
    """Raise FolderInUseError now if publishing into target would be refused (call before long work).

    writes: glob patterns of the names this writer puts in the folder. Returns the real target."""
    target = real_target(target)
    if target.exists() and not target.is_dir():
        raise FolderInUseError(f"{str(target)!r} exists and is not a folder")
    if not target.is_dir() or not _entries(target):
        return target
    foreign = foreign_entries(target)
    if not overwrite:
        if foreign:
            raise FolderInUseError(
                f"{str(target)!r} holds files parscale did not write ({describe(foreign)}); choose another folder "
                f"(with --overwrite parscale writes its files beside them and replaces only its own)")
        raise FolderInUseError(f"{str(target)!r} already holds parscale's output ({describe(_entries(target))}); "
                               f"replace it with --overwrite, or choose another folder")
    clash = [n for n in foreign if any(fnmatch.fnmatch(n, pat) for pat in writes)]
    if clash:
        raise FolderInUseError(f"{str(target)!r} holds {describe(clash)}, which parscale did not write (or which "
                               f"changed since) and would have to replace; --overwrite never replaces such files: "
                               f"move them away or choose another folder")
    return target


def publish_folder(tmp: Path, target: Path, writes=(), overwrite: bool = False) -> Path:
    """Move the finished folder tmp to target under the ownership rule (ownership.py); tmp is gone afterwards.

    Absent or empty target: tmp is renamed into place. A target holding only parscale's own entries
    (overwrite=True) is swapped for tmp in two renames (an exception between them puts the old folder
    back). A target that also holds the user's files (overwrite=True, none in the way) keeps them:
    parscale's own entries are replaced one by one. Returns the real target (through a link)."""
    try:
        for f in tmp.rglob("*"):  # some writers (safetensors) create files 0600 whatever the umask
            if not f.is_symlink():
                user_permissions(f, folder=f.is_dir())
        (tmp / MARKER).unlink(missing_ok=True)
        record_all(tmp)
        target = check_writable(target, [p.name for p in tmp.iterdir() if p.name != MARKER], overwrite)
        if not target.exists():
            os.replace(tmp, target)
        elif not _entries(target):
            (target / MARKER).unlink(missing_ok=True)
            target.rmdir()
            os.replace(tmp, target)
        elif not foreign_entries(target):
            _swap(tmp, target)
        else:  # overwrite=True with the user's files inside: replace our entries one by one, keep theirs
            new = [p.name for p in tmp.iterdir() if p.name != MARKER]
            for name in _entries(target):
                if is_owned(target, name):
                    remove_owned(target, name)
            for name in new:
                os.replace(tmp / name, target / name)
            add_entries(target, read_marker(tmp)["entries"])
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap(tmp: Path, target: Path) -> None:
    old = Path(tempfile.mkdtemp(prefix=temporary_name_prefix(target, "old"), dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


class RunLock:
    """An exclusive, non-blocking lock on `folder/.lock` held while a run writes the folder."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._fh = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise FolderInUseError(f"{str(self.path.parent)!r} is being written by {holder}; "
                                   f"two runs cannot share one folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None
