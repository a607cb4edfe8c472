"""A Python-code pretraining corpus from installed source trees, the way code corpora are cleaned.

    manifest = python_corpus(["/usr/lib/python3.12", site_packages], "runs/code/corpus.jsonl")
    # then: parscale data runs/code/corpus.jsonl --split-field split --out runs/code/data

- Every `*.py` file under the roots is read (sorted, so the corpus is the same on every run).
- Filters of the kind used for the Stack: drop files over 1 MB, with any line over 1000 characters,
  a mean line length over 100, or an alphanumeric share under 0.25; drop files that are not UTF-8.
- Exact deduplication by the sha256 of the content: vendored copies of a module keep the first
  path in sorted order.
- Each file belongs to a *package*: the first path component under its root (`numpy`, `torch`, `six`
  for a single module `six.py`; standard-library modules are prefixed `stdlib:`). Validation is held out
  by package, never by file, so no held-out file has a sibling in training: packages are visited in
  the order of the sha256 of their names and taken whole into validation until it holds
  `val_fraction` of the bytes; a package larger than `max_val_package` of the corpus is never taken
  (one huge package would otherwise decide the split on its own).
- Output: one JSONL document per kept file (`text`, `path`, `package`, `split`), written to a temporary
  name and renamed, and `{out}.manifest.json` listing every file seen (root-relative path, sha256,
  bytes, package, and the reason a dropped file was dropped) plus totals.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from parscale.io.files import atomic_write
from parscale.io.progress import progress_bar

MAX_FILE_BYTES = 1_000_000
MAX_LINE_CHARS = 1000
MAX_MEAN_LINE_CHARS = 100
MIN_ALNUM_SHARE = 0.25
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class CorpusError(ValueError):
    """Bad corpus input: the message names the problem."""


def quality_problem(text: str, size: int) -> str | None:
    """Why a source file fails the Stack-style filters, or None when it passes."""
    if size > MAX_FILE_BYTES:
        return "over 1 MB"
    if not text.strip():
        return "empty"
    lines = text.splitlines()
    if max(len(line) for line in lines) > MAX_LINE_CHARS:
        return "a line over 1000 characters"
    if sum(len(line) for line in lines) / len(lines) > MAX_MEAN_LINE_CHARS:
        return "mean line length over 100"
    if sum(ch.isalnum() for ch in text) / len(text) < MIN_ALNUM_SHARE:
        return "alphanumeric share under 0.25"
    return None


def _package(relative: Path, stdlib: bool) -> str:
    first = relative.parts[0]
    name = first[:-3] if len(relative.parts) == 1 and first.endswith(".py") else first
    return f"stdlib:{name}" if stdlib else name


def _python_files(root: Path):
    """*.py files under root in sorted order, not descending into nested package installs or caches."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if path.is_file() and not SKIP_DIRS.intersection(rel.parts[:-1]):
            yield path, rel


def choose_validation_packages(package_bytes: dict[str, int], val_fraction: float,
                               max_val_package: float = 0.01) -> set[str]:
    """Whole packages, in the order of the hash of their names, until they hold val_fraction of the bytes."""
    total = sum(package_bytes.values())
    chosen, held = set(), 0
    for name in sorted(package_bytes, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        if held >= val_fraction * total:
            break
        if package_bytes[name] <= max_val_package * total:
            chosen.add(name)
            held += package_bytes[name]
    return chosen


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def check_corpus_target(out: Path, overwrite: bool) -> None:
    """Refuse an --out parscale may not replace (before any work): a folder, a file that is not a corpus
    parscale wrote (proof: its manifest beside it names the file's sha256), or one of ours without
    overwrite. A manifest beside it that is not parscale's is refused too."""
    manifest_file = Path(f"{out}.manifest.json")
    if out.is_dir():
        raise CorpusError(f"--out {str(out)!r} is a folder; give the JSONL file to write (e.g. {out}/corpus.jsonl)")
    if not out.exists() and not manifest_file.exists():
        return
    try:
        manifest = json.loads(manifest_file.read_text())
        ours = isinstance(manifest, dict) and "files" in manifest and (
            not out.exists() or manifest.get("corpus_sha256") == _file_sha256(out))
    except (OSError, ValueError):
        ours = False
    if not ours:
        shown = str(out) if out.exists() else str(manifest_file)
        raise CorpusError(f"{shown!r} exists and is not a corpus parscale wrote (its manifest does not prove it); "
                          f"choose another --out")
    if not overwrite:
        raise CorpusError(f"{str(out)!r} already holds a corpus parscale wrote; replace it with --overwrite, or "
                          f"choose another --out")


def python_corpus(roots, out_file, val_fraction: float = 0.02, max_val_package: float = 0.01,
                  stdlib_roots=(), progress: bool = True, overwrite: bool = False) -> dict:
    """Build the corpus JSONL and its manifest; returns the manifest's totals.

    An existing out_file is replaced only with overwrite=True and only if it is a corpus parscale wrote
    (`check_corpus_target`)."""
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"val_fraction is the share of bytes held out: it must be in [0, 1), got {val_fraction}")
    if not 0 < max_val_package <= 1:
        raise CorpusError(f"max_val_package must be in (0, 1], got {max_val_package}")
    out = Path(out_file)
    check_corpus_target(out, overwrite)
    entries, kept, seen_hashes = [], [], {}
    all_roots = [(Path(r), False) for r in roots] + [(Path(r), True) for r in stdlib_roots]
    if not all_roots:
        raise CorpusError("no source roots given")
    bar = progress_bar(desc="corpus", unit="file", enabled=progress)
    for root, is_stdlib in all_roots:
        if not root.is_dir():
            raise CorpusError(f"source root {str(root)!r} is not a folder")
        for path, rel in _python_files(root):
            raw = path.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            entry = {"root": str(root), "path": str(rel), "sha256": digest, "bytes": len(raw),
                     "package": _package(rel, is_stdlib)}
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text, entry["dropped"] = None, "not UTF-8"
            if text is not None:
                problem = quality_problem(text, len(raw))
                if problem:
                    entry["dropped"] = problem
                elif digest in seen_hashes:
                    entry["dropped"] = f"duplicate of {seen_hashes[digest]}"
                else:
                    seen_hashes[digest] = f"{root}/{rel}"
                    kept.append((entry, text))
            entries.append(entry)
            bar.update(1, kept=f"{len(kept):,}")
    bar.close()
    if not kept:
        raise CorpusError(f"no Python files passed the filters under {', '.join(str(r) for r, _ in all_roots)}")
    package_bytes: dict[str, int] = {}
    for entry, _ in kept:
        package_bytes[entry["package"]] = package_bytes.get(entry["package"], 0) + entry["bytes"]
    val_packages = choose_validation_packages(package_bytes, val_fraction, max_val_package)
    lines = []
    for entry, text in kept:
        entry["split"] = "val" if entry["package"] in val_packages else "train"
        lines.append(json.dumps({"text": text, "path": f"{entry['root']}/{entry['path']}",
                                 "package": entry["package"], "split": entry["split"]}))
    atomic_write(out, ("\n".join(lines) + "\n").encode())
    drops: dict[str, int] = {}
    for e in entries:
        if "dropped" in e:
            reason = "duplicate" if e["dropped"].startswith("duplicate") else e["dropped"]
            drops[reason] = drops.get(reason, 0) + 1
    totals = {
        "roots": [str(r) for r, _ in all_roots], "files_seen": len(entries), "files_kept": len(kept),
        "bytes_seen": sum(e["bytes"] for e in entries), "bytes_kept": sum(e["bytes"] for e, _ in kept),
        "dropped": dict(sorted(drops.items())), "packages": len(package_bytes),
        "val_packages": sorted(val_packages),
        "val_bytes": sum(package_bytes[p] for p in val_packages),
        "corpus_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    manifest = {**totals, "files": entries}
    atomic_write(Path(f"{out}.manifest.json"), (json.dumps(manifest, indent=0) + "\n").encode())
    return totals
