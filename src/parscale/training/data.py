"""Text sources → token shards (memory-mapped uint16/uint32) + a manifest; a resumable batch loader.

    manifest = build_shards(["/usr/lib/python3.11"], "runs/data", tokenizer, glob="**/*.py")
    loader = TokenLoader("runs/data", "train", batch_size=8, seq_len=256, seed=0)
    x, y = loader.next_batch()          # [B, T] inputs and next-token targets
    state = loader.state_dict()         # the exact position, stored in checkpoints

Sources are files, folders (with a glob) or JSONL files (one document per line, text in a field;
`.jsonl.gz` / `.jsonl.xz` are read compressed). Documents are split into train / validation
deterministically by a hash of their path inside the source (and line), so a file never straddles the
split; a JSONL corpus that decides its own split (held out by package, say) names it in a field
(`split_field`, values "train" / "val"). Documents are tokenised in batches on all cores. Each split is
one flat token stream in which every document is followed by the EOS id (packing with EOS separators)
and written as `{split}.bin` with `manifest.json`
(source files with sha256, token counts, dtype, tokenizer, and each shard's sha256, taken while writing,
and the sha256 of its first and last MiB, checked at every start; `verify-data` checks the full one).
Files are written to temporary names and renamed, so an interrupted build leaves no half shard.

The loader cuts the stream into consecutive windows of seq_len + 1 tokens and visits them in a seeded
random order, epoch after epoch; its state is (epoch, index) and resuming continues with exactly the
batch that would have come next.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from parscale.io.documents import DocumentError, is_jsonl, read_documents
from parscale.io.files import atomic_write, check_writable, publish_folder, temporary_folder
from parscale.io.ownership import fingerprint
from parscale.io.progress import progress_bar

DataError = DocumentError  # bad data input: one error type for every reader of documents


def _documents(sources, glob: str, text_field: str, split_field: str | None = None, skipped: list | None = None
               ) -> Iterator[tuple[str, str, str, str | None]]:
    """(document id, source file, text, split or None) for every document of the sources, in a stable order."""
    for doc in read_documents(sources, glob, text_field, skipped):
        split = None
        if split_field is not None:
            if not is_jsonl(Path(doc.source)):
                raise DataError(f"split_field needs JSONL sources; {doc.source!r} is not one")
            split = doc.fields.get(split_field)
            if split not in ("train", "val"):
                shown = repr(split) if len(repr(split)) < 60 else repr(split)[:57] + "..."
                raise DataError(f"{doc.source}, line {doc.line}: field {split_field!r} is {shown}, "
                                f"not 'train' or 'val'")
        yield doc.doc_id, doc.source, doc.text, split


def split_of(doc_id: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little") / 2**64
    return "val" if h < val_fraction else "train"


def iter_texts(sources, glob: str = "**/*.txt", text_field: str = "text", max_chars: int = 1 << 20,
               split_field: str | None = None, sample: float = 1.0, val_fraction: float | None = None):
    """Document texts cut into pieces of at most max_chars (for tokenizer training).

    With split_field or val_fraction given, held-out documents are skipped (the tokenizer never sees
    validation text); sample < 1 keeps that share of documents, chosen by a hash of their id."""
    for doc_id, _, text, split in _documents(sources, glob, text_field, split_field):
        if split is None and val_fraction is not None:
            split = split_of(doc_id, val_fraction)
        if split == "val" or (sample < 1.0 and split_of("sample:" + doc_id, sample) != "val"):
            continue
        for i in range(0, len(text), max_chars):
            yield text[i : i + max_chars]


def _batches(documents, max_chars: int = 8 << 20, max_docs: int = 4096):
    """Group documents into lists of about max_chars characters (for batched, multi-threaded encoding)."""
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc[2])
        if size >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


DATA_FILES = ("train.bin", "val.bin", "manifest.json", "tokenizer.json")


def build_shards(sources, out_dir, tokenizer, glob: str = "**/*.txt", text_field: str = "text",
                 val_fraction: float = 0.05, eos_id: int | None = None, progress: bool = True,
                 split_field: str | None = None, overwrite: bool = False) -> dict:
    """Tokenise the sources into out_dir (see the module docstring). The folder is written whole under a
    temporary name and renamed into place, so an interrupted build leaves the previous folder as it was;
    a folder holding other files than a data folder's is refused unless overwrite (which keeps them)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    check_writable(out, DATA_FILES, overwrite)
    eos = eos_id if eos_id is not None else tokenizer.token_to_id("<|endoftext|>")
    if eos is None:
        raise DataError("the tokenizer has no <|endoftext|> token; pass eos_id")
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    tokens = {"train": [], "val": []}
    files: dict[str, dict] = {}
    n_tok, skipped = 0, []
    bar = progress_bar(desc="data", unit="tok", enabled=progress)
    for batch in _batches(d for d in _documents(sources, glob, text_field, split_field, skipped) if d[2]):
        encoded = tokenizer.encode_batch([text for _, _, text, _ in batch])  # parallel in the Rust library
        for (doc_id, source, _, given_split), enc in zip(batch, encoded, strict=True):
            if source not in files:
                files[source] = {"path": source, "sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest(),
                                 "tokens": 0, "split": None}
            ids = enc.ids + [eos]
            split = given_split or split_of(doc_id, val_fraction)
            tokens[split].append(np.asarray(ids, dtype=dtype))
            files[source]["tokens"] += len(ids)
            files[source]["split"] = split if files[source]["split"] in (None, split) else "mixed"
            n_tok += len(ids)
            bar.update(len(ids), files=len(files))
    bar.close()
    if progress:
        if skipped:
            print(f"[data] skipped {len(skipped)} files that are not UTF-8 text (listed in the manifest)",
                  file=sys.stderr)
    if not tokens["train"]:
        raise DataError("no training text found in the sources"
                        + (f" ({len(skipped)} files skipped as not UTF-8 text)" if skipped else ""))
    held_out_from = None
    if not tokens["val"] and split_field:
        # the rows name their split: moving one the user labelled "train" would overrule them
        raise DataError(f"no row has {split_field!r} = 'val': label the validation rows, or leave --split-field "
                        f"out to hold out documents by --val-fraction")
    if not tokens["val"]:
        held_out_from = _hold_out(tokens, val_fraction)
    manifest = {"dtype": np.dtype(dtype).name, "eos_id": eos, "vocab_size": vocab,
                "val_fraction": None if split_field else val_fraction, "split_field": split_field,
                "val_held_out_from": held_out_from,
                "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
                "files": sorted(files.values(), key=lambda f: f["path"]),
                "skipped_files": len(skipped), "skipped": skipped}
    tmp = temporary_folder(out)
    try:
        for split, parts in tokens.items():
            # Written part by part: concatenating first would hold the corpus twice in memory. The sha256
            # is taken on the way, so hashing costs no second pass over the data.
            digest = hashlib.sha256()
            atomic_write(tmp / f"{split}.bin", _hashed((memoryview(part) for part in parts), digest))
            manifest[f"{split}_tokens"] = int(sum(part.size for part in parts))
            manifest[f"{split}_documents"] = len(parts)
            manifest[f"{split}_sha256"] = digest.hexdigest()
            manifest[f"{split}_head_tail_sha256"] = fingerprint(tmp / f"{split}.bin")["head_tail_sha256"]
        atomic_write(tmp / "tokenizer.json", tokenizer.to_str().encode())
        atomic_write(tmp / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, out, DATA_FILES, overwrite)
    return manifest


def _hashed(parts, digest):
    for part in parts:
        digest.update(part)
        yield part


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_data_folder(folder, splits=("train", "val"), full_hash: bool = False) -> dict:
    """The manifest of a `parscale data` folder after checking that the folder is what it says: each
    shard's size against its token count and the SHA-256 of its first and last MiB against the manifest
    (every start of training or evaluation: cheap at any size), or with full_hash its whole SHA-256
    (`parscale verify-data`: one pass over the data); every id inside the vocabulary; tokenizer.json against
    the manifest's hash. One DataError names the first file that is wrong. A manifest written before
    shards were hashed has no hashes to compare (see `shard_hashes_recorded`)."""
    folder = Path(folder)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise DataError(f"{str(folder)!r} has no manifest.json: build it with `parscale data`")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        dtype, vocab = np.dtype(manifest["dtype"]), int(manifest["vocab_size"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{manifest_file} is not a parscale data manifest ({type(e).__name__}: {e})") from None
    rebuild = "rebuild the folder with `parscale data`"
    for split in splits:
        shard = folder / f"{split}.bin"
        if not shard.is_file():
            raise DataError(f"{shard} is missing; {rebuild}")
        expected = manifest.get(f"{split}_tokens")
        size = shard.stat().st_size
        if expected is not None and size != expected * dtype.itemsize:
            raise DataError(f"{shard} holds {size:,} bytes but the manifest says {expected:,} {dtype.name} tokens "
                            f"({expected * dtype.itemsize:,} bytes): it was truncated or replaced; {rebuild}")
        if size % dtype.itemsize:
            raise DataError(f"{shard} holds {size:,} bytes: not a whole number of {dtype.name} ids; {rebuild}")
        tokens = np.memmap(shard, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        top = int(tokens.max()) if tokens.size else 0
        if top >= vocab:
            raise DataError(f"{shard} holds token id {top}, outside the manifest's vocabulary of {vocab}; {rebuild}")
        key = f"{split}_sha256" if full_hash else f"{split}_head_tail_sha256"
        recorded = manifest.get(key)
        if recorded is not None:
            actual = _sha256(shard) if full_hash else fingerprint(shard)["head_tail_sha256"]
            if actual != recorded:
                what = "its sha256" if full_hash else "the sha256 of its first and last MiB"
                raise DataError(f"{shard} is not the shard the manifest describes ({what} differs): it was "
                                f"rewritten since it was built; {rebuild}")
    tok_file = folder / "tokenizer.json"
    if manifest.get("tokenizer_sha256") and tok_file.is_file() and _sha256(tok_file) != manifest["tokenizer_sha256"]:
        raise DataError(f"{tok_file} is not the tokenizer the shards were made with (its sha256 differs from "
                        f"the manifest's); put the original back or {rebuild}")
    return manifest


def shard_hashes_recorded(manifest: dict, splits=("train", "val")) -> bool:
    return all(f"{split}_sha256" in manifest for split in splits)


def changed_sources(manifest: dict) -> list[str]:
    """Source files of the manifest that exist here and no longer match their recorded sha256 (files the
    manifest names that are absent here, e.g. data built on another machine, are not reported)."""
    return [f["path"] for f in manifest.get("files", [])
            if Path(f["path"]).is_file() and _sha256(Path(f["path"])) != f["sha256"]]


def _hold_out(tokens: dict[str, list[np.ndarray]], val_fraction: float) -> str:
    """No document fell into validation (a tiny corpus): hold out the last training document, or, when
    there is only one, its last val_fraction of tokens (at least 2). Returns what was held out."""
    train = tokens["train"]
    if len(train) > 1:
        tokens["val"].append(train.pop())
        return "the last training document"
    doc = train[0]
    k = max(2, round(doc.size * max(val_fraction, 0.01)))
    if doc.size - k < 2:
        raise DataError(f"the corpus is one document of {doc.size} tokens: too short to hold any of it out "
                        f"for validation")
    train[0], tokens["val"] = doc[:-k], [doc[-k:]]
    return f"the last {k} tokens of the only document"


class TokenLoader:
    """Seeded, resumable batches of consecutive windows from one split's token stream."""

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, seed: int = 0):
        folder = Path(data_dir)
        self.manifest = check_data_folder(folder, (split,))
        self.tokens = np.memmap(folder / f"{split}.bin", dtype=self.manifest["dtype"], mode="r")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.n_windows = (len(self.tokens) - 1) // seq_len
        if self.n_windows < batch_size:
            raise DataError(f"the {split} split has {len(self.tokens):,} tokens: too few for {batch_size} "
                            f"windows of {seq_len}")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def skip(self, windows: int) -> None:
        """Move past `windows` windows of the seeded order (continue where an earlier run stopped)."""
        position = self.epoch * self.n_windows + self.index + windows
        self.epoch, self.index = divmod(position, self.n_windows)
        self._order = self._permutation(self.epoch)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            if self.index == self.n_windows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            start = int(self._order[self.index]) * self.seq_len
            rows.append(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
            self.index += 1
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def windows(self, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows in stream order (for evaluation), batched; the loader state is untouched. With a limit,
        that many windows evenly spaced over the whole split, so a partial evaluation samples every part
        of it (documents are stored in path order)."""
        n = self.n_windows if limit is None else min(limit, self.n_windows)
        starts = [i * self.n_windows // n for i in range(n)]
        for i in range(0, n, self.batch_size):
            batch = torch.from_numpy(np.stack([np.asarray(self.tokens[j * self.seq_len : (j + 1) * self.seq_len + 1],
                                                          dtype=np.int64) for j in starts[i : i + self.batch_size]]))
            yield batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size"):
            if state[key] != getattr(self, key):
                raise DataError(f"the checkpoint's data loader has {key}={state[key]}, this run {getattr(self, key)}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)
