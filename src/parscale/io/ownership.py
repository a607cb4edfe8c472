"""What parscale may delete or replace: the entries it can prove it wrote, recorded in `.parscale-owned.json`.

The rule every writer follows (`new`, `convert`, `save`, `train`, `data`, `corpus`, `demo`, adapters):

- Every folder parscale writes into holds the marker `.parscale-owned.json`, listing the entries (files
  and folders) parscale put there. A file is listed with its size and the SHA-256 of its first and last
  MiB, so a file the user replaced or edited under the same name stops being parscale's; an entry that
  grows while a run trains (`metrics.jsonl`, `checkpoints/`) is listed by name alone.
- parscale removes or replaces an entry only if the marker lists it (and, for a file, its fingerprint
  still matches). Anything else in the way of a write is refused with one error naming the path;
  `overwrite` lets parscale replace its own entries and never anything else. A folder written before the
  marker existed carries no proof: its files count as the user's.
- A single file written beside the user's files (a corpus JSONL) is proven by its own manifest instead
  (see training/corpus.py).
- Work in progress lives in temporary folders beside the target, named `.NAME.tmp-PID-*` (being written)
  or `.NAME.old-PID-*` (the previous folder during a swap), each holding a marker. A process killed
  mid-write leaves one behind; the next write to that target removes those whose process is gone (same
  host) and says so on stderr (`sweep_stale`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

MARKER = ".parscale-owned.json"
_MIB = 2**20


class FolderInUseError(ValueError):
    """A folder parscale was asked to write holds files it did not write, or another process holds it."""


def fingerprint(path: Path) -> dict:
    """Size and SHA-256 of the first and last MiB: cheap for a 100 GB file, and changed by any rewrite
    that changes the size, the start or the end."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(_MIB))
        if size > 2 * _MIB:
            fh.seek(size - _MIB)
            h.update(fh.read(_MIB))
        elif size > _MIB:
            h.update(fh.read())
    return {"size": size, "head_tail_sha256": h.hexdigest()}


def read_marker(folder: Path) -> dict:
    """The marker's content ({} when absent, unreadable or not parscale's)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("entries"), dict) else {}


def _write_marker(folder: Path, data: dict) -> None:
    from parscale.io.files import atomic_write

    atomic_write(Path(folder) / MARKER, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def record(folder, names, grows: bool = False) -> None:
    """Add entries of folder to its marker as parscale's (files fingerprinted unless `grows`)."""
    folder = Path(folder)
    data = read_marker(folder) or {"written_by": "parscale", "entries": {}}
    for name in names:
        path = folder / name
        if path.is_symlink() or not path.exists():
            raise FileNotFoundError(f"cannot record {str(path)!r} as written: it is not there")
        if path.is_dir():
            data["entries"][name] = {"kind": "folder"}
        elif grows:
            data["entries"][name] = {"kind": "file", "grows": True}
        else:
            data["entries"][name] = {"kind": "file", **fingerprint(path)}
    _write_marker(folder, data)


def add_entries(folder, entries: dict) -> None:
    """Add marker entries (as read from another marker) to folder's marker."""
    data = read_marker(folder) or {"written_by": "parscale", "entries": {}}
    data["entries"].update(entries)
    _write_marker(Path(folder), data)


def record_all(folder) -> None:
    """Record every entry of a folder parscale has just written in full (a temporary folder)."""
    folder = Path(folder)
    record(folder, [p.name for p in folder.iterdir() if p.name != MARKER])


def forget(folder, names) -> None:
    """Drop entries from the marker (after removing them)."""
    data = read_marker(folder)
    if data:
        for name in names:
            data["entries"].pop(name, None)
        _write_marker(Path(folder), data)


def is_owned(folder, name: str, marker: dict | None = None) -> bool:
    """True if folder/name exists and the marker (read here unless given) proves parscale wrote it
    (unchanged, for a file)."""
    path = Path(folder) / name
    entry = (read_marker(folder) if marker is None else marker).get("entries", {}).get(name)
    if not isinstance(entry, dict) or path.is_symlink() or not path.exists():
        return False
    if entry.get("kind") == "folder":
        return path.is_dir()
    if not path.is_file():
        return False
    return entry.get("grows", False) or fingerprint(path) == {k: entry.get(k) for k in ("size", "head_tail_sha256")}


def foreign_entries(folder) -> list[str]:
    """Names in folder that parscale cannot prove it wrote (the marker itself excluded)."""
    folder = Path(folder)
    marker = read_marker(folder)  # once for the whole folder
    return sorted(p.name for p in folder.iterdir() if p.name != MARKER and not is_owned(folder, p.name, marker))


def remove_owned(folder, name: str) -> None:
    """Remove folder/name if parscale wrote it; refuse with one error naming it otherwise."""
    path = Path(folder) / name
    if not path.exists() and not path.is_symlink():
        return
    if not is_owned(folder, name):
        raise FolderInUseError(f"{str(path)!r} was not written by parscale (or was changed since); it is left "
                               f"as it is: move it away or choose another folder")
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    forget(folder, [name])


def describe(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


# --- temporary folders beside a target, and sweeping the ones a killed process left -----------------------

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")


def temporary_name_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def mark_temporary(folder: Path) -> None:
    _write_marker(folder, {"written_by": "parscale", "entries": {}, "temporary": {
        "pid": os.getpid(), "host": socket.gethostname()}})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(target) -> list[Path]:
    """Remove the temporary folders a killed parscale process left beside target; returns them.

    Only folders named as parscale names them, holding parscale's marker, whose process (named in the
    folder's name) is no longer running on this host."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    for p in parent.glob(f".{target.name}.*-*"):
        m = _TEMP.match(p.name)
        if not m or m["name"] != target.name or p.is_symlink() or not p.is_dir():
            continue
        marker = read_marker(p)
        temp = marker.get("temporary") or {}
        if not marker or temp.get("host", socket.gethostname()) != socket.gethostname() or _alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        print(f"note: removed {str(p)!r}, a temporary folder left by an interrupted parscale process",
              file=sys.stderr)
    return removed
