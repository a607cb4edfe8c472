"""A training run's folder: one writer at a time, versioned checkpoints, metrics that match them.

    out/
      metrics.jsonl                 one JSON line per step, never ahead of a resumed checkpoint
      checkpoints/step-00000200/    model/ (released format), trainer.pt, train_config.json
      checkpoints/latest -> step-00000200
      adapter/                      frozen-backbone runs only
      .lock                         held by the process that trains into out

A checkpoint folder is written under a temporary name and renamed when complete, so every
`step-*` folder is whole; `latest` is then re-pointed with one rename (a new symbolic link replacing
the old), and only after that are folders beyond the newest `keep` removed. A process killed at any
moment therefore leaves the previous checkpoint (or the new one) loadable, and `latest_checkpoint`
finds the newest complete folder even if the kill came between the rename and the re-pointing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from parscale.io.files import atomic_write, new_temporary_folder, real_target
from parscale.io.ownership import FolderInUseError, describe, is_owned, record, remove_owned

RUN_ENTRIES = ("metrics.jsonl", "checkpoints", "adapter", "tensorboard")
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _complete(folder: Path) -> bool:
    return (folder / "trainer.pt").is_file() and (folder / "model" / "config.json").is_file()


def latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint folder of a run (via `latest`, else by scanning), or None."""
    ckdir = Path(out) / "checkpoints"
    link = ckdir / "latest"
    if link.is_symlink() and _complete(link.resolve()):
        return link.resolve()
    steps = sorted((int(m.group(1)), p) for p in ckdir.glob("step-*") if (m := _STEP.match(p.name)) and _complete(p))
    return steps[-1][1] if steps else None


def clean_interrupted(out) -> None:
    """Remove what killed saves left behind (temporary checkpoint folders and links)."""
    ckdir = Path(out) / "checkpoints"
    if ckdir.is_dir():
        for p in ckdir.glob(".*.tmp-*"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def write_checkpoint(out, step: int, write, keep: int = 2) -> Path:
    """Write one checkpoint with write(folder) into checkpoints/step-N, point `latest` at it, prune."""
    ckdir = Path(out) / "checkpoints"
    if not ckdir.is_dir():
        ckdir.mkdir(parents=True)
        record(out, ["checkpoints"])
    final = ckdir / checkpoint_name(step)
    if not _complete(final):
        tmp = new_temporary_folder(f".{final.name}.tmp-", ckdir)
        try:
            write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # an incomplete folder of that name cannot come from here, but never trust it
            shutil.rmtree(final)
        os.replace(tmp, final)
    link_tmp = ckdir / f".latest.tmp-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, ckdir / "latest")
    if keep > 0:
        steps = sorted((int(m.group(1)), p) for p in ckdir.glob("step-*") if (m := _STEP.match(p.name)))
        for _, p in steps[:-keep]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    return final


def has_run(out) -> bool:
    """A run that can be resumed: one with a checkpoint (metrics alone cannot be continued)."""
    return latest_checkpoint(out) is not None


def start_fresh(out, overwrite: bool) -> None:
    """Prepare out for a new run under the ownership rule (io/ownership.py).

    A run's entries (metrics.jsonl, checkpoints/, adapter/, tensorboard/) already there are removed only
    if parscale wrote them: with overwrite, or without it when the run there has no checkpoint (it was
    stopped before its first save, so nothing can be resumed and nothing is lost: it starts over, with a
    note). An entry of those names that parscale did not write is refused, overwrite or not."""
    out = real_target(out)
    present = [n for n in RUN_ENTRIES if (out / n).exists() or (out / n).is_symlink()]
    foreign = [n for n in present if not is_owned(out, n)]
    if foreign:
        raise FolderInUseError(f"{str(out)!r} holds {describe(foreign)}, which parscale did not write (a run "
                               f"writes these names); --overwrite never removes them: move them away or choose "
                               f"another --out")
    if present and has_run(out) and not overwrite:
        raise FolderInUseError(f"{str(out)!r} already holds a training run; continue it with --resume, or "
                               f"start over with --overwrite (removes its checkpoints and metrics), or choose "
                               f"another --out")
    if present and not overwrite:
        print(f"note: {str(out)!r} holds a run stopped before its first checkpoint; starting it over",
              file=sys.stderr)
    for name in present:
        remove_owned(out, name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("")
    record(out, ["metrics.jsonl"], grows=True)


def cut_metrics(out, step: int) -> None:
    """Drop the metrics lines of steps after `step` (written before a crash, about to be redone)."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut short by the crash: nothing after it is kept
    atomic_write(path, ("\n".join(keep) + "\n" if keep else "").encode())


__all__ = ["FolderInUseError", "checkpoint_name", "clean_interrupted", "cut_metrics", "has_run", "latest_checkpoint",
           "start_fresh", "write_checkpoint"]
