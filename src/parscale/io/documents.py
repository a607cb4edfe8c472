"""One reader of text sources for every command that reads documents (`parscale data`, `parscale eval`).

A source is a text file, a folder (files matching a glob, recursively, in path order), or a JSONL
file (one JSON object per line, the text in a field) — `.jsonl`, `.jsonl.gz` and `.jsonl.xz` alike.
`read_documents` yields `SourceDocument(doc_id, source, text, fields)`, where `doc_id` depends only
on the path inside the source (and the line), so splits made from it do not depend on where the
source lies. Every malformed input gets one `DocumentError` naming the file, the line and what was
expected. A plain file that is not UTF-8 text (invalid UTF-8, or a NUL byte: binary data) is skipped,
not read with replacement characters, and recorded in the caller's `skipped` list, as the corpus
builder drops such files; a JSONL file must be valid UTF-8, since it is structured data.
"""

from __future__ import annotations

import gzip
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")


class DocumentError(ValueError):
    """A source that cannot be read as documents: the message names the file and the problem."""


@dataclass
class SourceDocument:
    doc_id: str
    source: str
    text: str
    fields: dict = field(default_factory=dict)
    """The other fields of a JSONL row (e.g. 'domain', a split field); empty for plain files."""
    line: int | None = None
    """The line of a JSONL row (1-based)."""


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


def open_text(path: Path):
    """A text handle on a plain, .gz or .xz file."""
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def source_files(path: Path, glob: str) -> list[Path]:
    if not path.exists():
        raise DocumentError(f"data source {str(path)!r} does not exist")
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.glob(glob) if p.is_file())
    if not files:
        raise DocumentError(f"no files match {glob!r} under {str(path)!r}")
    return files


def read_jsonl(file: Path, text_field: str, key: str | None = None) -> Iterator[SourceDocument]:
    key = key or file.name
    try:
        with open_text(file) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DocumentError(f"{file}, line {n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DocumentError(f"{file}, line {n}: expected a JSON object, got {type(row).__name__}")
                if text_field not in row:
                    raise DocumentError(f"{file}, line {n}: no field {text_field!r} (fields: {', '.join(row)[:200]})")
                text = row.pop(text_field)
                if not isinstance(text, str):
                    raise DocumentError(f"{file}, line {n}: field {text_field!r} must be a string, "
                                        f"got {type(text).__name__}")
                yield SourceDocument(f"{key}:{n}", str(file), text, row, n)
    except (UnicodeDecodeError, EOFError, OSError, lzma.LZMAError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DocumentError(f"{file}: cannot be read as UTF-8 JSONL ({type(e).__name__}: {e})") from None


def read_text_file(file: Path) -> tuple[str | None, str | None]:
    """(text, None) for a UTF-8 text file, (None, why) for one that is binary or not UTF-8."""
    data = file.read_bytes()
    if b"\0" in data:
        return None, "binary (NUL bytes)"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {e.start})"


def read_documents(sources, glob: str = "**/*.txt", text_field: str = "text",
                   skipped: list | None = None) -> Iterator[SourceDocument]:
    """Every document of the sources, in a stable order (see the module docstring).

    skipped: a list that receives {"path", "reason"} for every file skipped as not UTF-8 text."""
    for src in sources:
        path = Path(src)
        for f in source_files(path, glob):
            key = str(f.relative_to(path)) if path.is_dir() else f.name
            if is_jsonl(f):
                yield from read_jsonl(f, text_field, key)
                continue
            text, why = read_text_file(f)
            if text is None:
                if skipped is not None:
                    skipped.append({"path": str(f), "reason": why})
                continue
            yield SourceDocument(key, str(f), text)
