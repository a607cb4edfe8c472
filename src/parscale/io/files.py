"""Writing files and folders so that nothing is ever half-written and nothing of the user's is deleted.

- `atomic_write(path, data)` / `write_json_atomic(obj, path)`: a temporary file in the same folder,
  then one rename.
- `publish_folder(tmp, target, owned, overwrite)`: put a finished folder (written under a temporary
  name beside the target) in place. parscale replaces only what it owns: a target that is absent,
  empty, or holds only files parscale writes (`owned`, glob patterns) is swapped for the new folder;
  a target holding anything else is refused with one error naming those files, unless
  `overwrite=True`, in which case only parscale's own files are replaced and the others are kept.
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


class FolderInUseError(ValueError):
    """A folder parscale was asked to write holds files it did not write, or another process holds it."""


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


def foreign_entries(folder: Path, owned) -> list[str]:
    """Names in folder that match none of the owned glob patterns."""
    return sorted(p.name for p in folder.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in owned))


def temporary_folder(target: Path) -> Path:
    """A new empty folder beside target (same file system, so it can be renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return new_temporary_folder(f".{target.name}.tmp-", target.parent)


def check_writable(target: Path, owned, overwrite: bool = False) -> None:
    """Raise FolderInUseError now if publishing into target would be refused (call before long work)."""
    if target.exists() and not target.is_dir():
        raise FolderInUseError(f"{str(target)!r} exists and is not a folder")
    if target.is_dir() and not overwrite:
        foreign = foreign_entries(target, owned)
        if foreign:
            shown = ", ".join(foreign[:8]) + (" ..." if len(foreign) > 8 else "")
            raise FolderInUseError(
                f"{str(target)!r} holds files parscale did not write ({shown}); choose another folder or "
                f"overwrite (only parscale's own files are then replaced, the others are kept)")


def publish_folder(tmp: Path, target: Path, owned, overwrite: bool = False) -> Path:
    """Move the finished folder tmp to target (see the module docstring); tmp is gone afterwards."""
    try:
        for f in tmp.rglob("*"):  # some writers (safetensors) create files 0600 whatever the umask
            if not f.is_symlink():
                user_permissions(f, folder=f.is_dir())
        check_writable(target, owned, overwrite)
        if not target.exists():
            os.replace(tmp, target)
        elif not any(target.iterdir()):
            target.rmdir()
            os.replace(tmp, target)
        elif not foreign_entries(target, owned):
            _swap(tmp, target)
        else:  # overwrite=True with the user's files inside: replace our files one by one, keep theirs
            new = {p.name for p in tmp.iterdir()}
            for p in target.iterdir():
                if p.name not in new and any(fnmatch.fnmatch(p.name, pat) for pat in owned):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            for name in sorted(new):
                dest = target / name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                os.replace(tmp / name, dest)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap(tmp: Path, target: Path) -> None:
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
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
