"""Held-out loss, perplexity and bits per byte of a model on text files or token shards.

    parscale eval --model DIR --data PATH [--max-length 1024 --stride 512] [--out result.json]

PATH is a text file, a folder (files matching --glob, recursively), a JSONL file (`.jsonl`, `.jsonl.gz`
or `.jsonl.xz`; one document per line, text in --text-field; an optional "domain" field groups results),
or a token shard `*.bin` (raw uint16/uint32 ids: the dtype its folder's manifest.json names, else
--token-dtype, default uint16). Each document is tokenised with the
checkpoint's tokenizer.json and preceded by the EOS id when the tokenizer has one, so its first token is
predicted too. Files are read by documents.py, the reader `parscale data` uses.

Long documents are scored with sliding windows of `max_length` tokens moved by `stride` (default
max_length / 2): every token is predicted exactly once, each with at least `max_length − stride`
tokens of context once the first window is full (the Hugging Face perplexity recipe). Loss is
summed only over real target tokens, never padding.
Results: overall, per domain (the JSONL field, else the first folder level) and per source file;
bits per byte = total NLL / ln 2 / UTF-8 bytes of the scored text (not defined for token shards).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from parscale.io.documents import JSONL_SUFFIXES, DocumentError, read_documents
from parscale.io.progress import progress_bar

EvalDataError = DocumentError  # bad evaluation input: the same error type as every document reader's


@dataclass
class Document:
    source: str
    domain: str
    ids: np.ndarray
    n_bytes: int | None


def shard_dtype(path: Path, token_dtype: str | None) -> str:
    """The id type of a token shard: the one the `parscale data` manifest beside it names (a contradicting
    `token_dtype` is an error: uint32 ids read as uint16 give two in-vocabulary ids each, silently), else
    `token_dtype`, else uint16."""
    manifest = path.parent / "manifest.json"
    named = None
    if manifest.is_file():
        try:
            named = json.loads(manifest.read_text()).get("dtype")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            named = None  # not a data folder's manifest: nothing to go by
    if named in ("uint16", "uint32"):
        if token_dtype is not None and token_dtype != named:
            raise EvalDataError(f"{path}: its folder's manifest.json says its shards are {named}, not {token_dtype} "
                                f"(leave --token-dtype out)")
        return named
    return token_dtype or "uint16"


def check_ids(ids: np.ndarray, vocab_size: int, source) -> None:
    """One error naming the first token id outside [0, vocab_size) (an index error, or a device assert, later)."""
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise EvalDataError(f"{source}: token id {int(ids[bad.argmax()])} is outside the vocabulary [0, {vocab_size})")


def iter_documents(path, tokenizer, glob: str = "**/*.txt", text_field: str = "text",
                   token_dtype: str | None = None) -> Iterator[Document]:
    """Tokenised documents of a text file, folder, JSONL (.gz / .xz too) or `*.bin` token shard (ids in the
    dtype its folder's manifest names, else `token_dtype`, else uint16)."""
    path = Path(path)
    if not path.exists():
        raise EvalDataError(f"evaluation data {str(path)!r} does not exist")
    if path.suffix == ".bin":
        token_dtype = shard_dtype(path, token_dtype)
        itemsize = np.dtype(token_dtype).itemsize
        if path.stat().st_size % itemsize:
            raise EvalDataError(f"{path} holds {path.stat().st_size} bytes: not a whole number of {token_dtype} "
                                f"token ids (truncated, or another --token-dtype)")
        yield Document(path.name, path.stem, np.memmap(path, dtype=np.dtype(token_dtype), mode="r"), None)
        return
    eos = tokenizer.token_to_id("<|endoftext|>") if tokenizer is not None else None
    prefix = [eos] if eos is not None else []
    for doc in read_documents([path], glob, text_field):
        if not doc.text:
            continue
        if doc.line is not None:  # a JSONL row: its "domain" field, else the file's name
            source, domain = f"{Path(doc.source).name}:{doc.line}", str(doc.fields.get("domain", _stem(doc.source)))
        elif path.is_dir():
            rel = Path(doc.doc_id)
            source, domain = doc.doc_id, rel.parts[0] if len(rel.parts) > 1 else "."
        else:
            source, domain = path.name, path.stem
        ids = np.asarray(prefix + tokenizer.encode(doc.text).ids, dtype=np.int64)
        yield Document(source, domain, ids, len(doc.text.encode("utf-8")))


def _stem(source: str) -> str:
    name = Path(source).name
    for suffix in JSONL_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_targets): window [begin, end) scores its last n_targets positions.

    The first window scores every position it can; each later one scores the next `stride` tokens
    with the window extended left to max_length tokens. Token 0 has no context and is never scored.
    """
    out, prev_end = [], 1
    while prev_end < n_tokens:
        end = min(max_length if not out else prev_end + stride, n_tokens)
        begin = max(0, end - max_length)
        out.append((begin, end, end - prev_end))
        prev_end = end
    return out


def check_window_settings(positions: int, max_length: int | None, stride: int | None, batch_size: int
                          ) -> tuple[int, int]:
    """The window and stride to use (defaults filled in), or one error naming the setting that cannot work."""
    for name, value in (("max_length", max_length), ("stride", stride), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is None:
        max_length = positions
    if not 2 <= max_length <= positions:
        raise ValueError(f"max_length must be in [2, {positions}] (a window needs a token of context and a "
                         f"target; the model has {positions} positions), got {max_length}")
    if stride is None:
        stride = max_length // 2
    if not 0 < stride < max_length:
        raise ValueError(f"stride must be in [1, max_length - 1 = {max_length - 1}] (each window keeps "
                         f"max_length - stride tokens of context), got {stride}")
    return max_length, stride


@torch.no_grad()
def score_windows(model, chunks: list[tuple[list[int], int]], device) -> list[float]:
    """Summed NLL (nats) of the last n_targets tokens of each id list, batched with right padding."""
    width = max(len(ids) for ids, _ in chunks)
    batch = torch.zeros(len(chunks), width, dtype=torch.long)
    for i, (ids, _) in enumerate(chunks):
        batch[i, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))  # a copy: shards are read-only
    # Right padding needs no mask: causal attention never lets a real token see the padding after it.
    logits = model(batch.to(device)).float()
    out = []
    for i, (ids, n_targets) in enumerate(chunks):
        t = len(ids)
        pred = logits[i, t - 1 - n_targets : t - 1]
        target = batch[i, t - n_targets : t].to(device)
        out.append(float(F.cross_entropy(pred, target, reduction="sum")))
    return out


def evaluate(model, tokenizer, data, max_length: int | None = None, stride: int | None = None,
             batch_size: int = 8, glob: str = "**/*.txt", text_field: str = "text", token_dtype: str | None = None,
             progress: bool = True) -> dict:
    cfg = model.config
    max_length, stride = check_window_settings(cfg.max_position_embeddings, max_length, stride, batch_size)
    device = model.model.embed_tokens.weight.device
    docs = list(iter_documents(data, tokenizer, glob, text_field, token_dtype))
    if not docs or all(len(d.ids) < 2 for d in docs):
        raise EvalDataError(f"evaluation data {str(data)!r} holds no text to score")
    for d in docs:
        check_ids(d.ids, cfg.vocab_size, d.source)
    jobs = [(d_i, d.ids[b:e], n) for d_i, d in enumerate(docs) for b, e, n in windows(len(d.ids), max_length, stride)]
    jobs.sort(key=lambda j: len(j[1]))  # similar lengths share a batch: less padding
    nll = defaultdict(float)
    total_targets = sum(n for _, _, n in jobs)
    with progress_bar(total=total_targets, desc="eval", unit="tok", enabled=progress) as bar:
        for i in range(0, len(jobs), batch_size):
            part = jobs[i : i + batch_size]
            for (d_i, _, n), value in zip(part, score_windows(model, [(ids, n) for _, ids, n in part], device),
                                          strict=True):
                nll[d_i] += value
                bar.update(n)

    def summary(indices) -> dict:
        loss_sum = sum(nll[i] for i in indices)
        tokens = sum(len(docs[i].ids) - 1 for i in indices)
        nbytes = [docs[i].n_bytes for i in indices]
        out = {"tokens": tokens, "loss": loss_sum / tokens, "perplexity": math.exp(loss_sum / tokens)}
        out["bits_per_byte"] = (loss_sum / math.log(2) / sum(nbytes)) if None not in nbytes else None
        return out

    by_domain = defaultdict(list)
    for i, d in enumerate(docs):
        by_domain[d.domain].append(i)
    return {"data": str(data), "max_length": max_length, "stride": stride, "eos_prefix": tokenizer is not None
            and tokenizer.token_to_id("<|endoftext|>") is not None, **summary(range(len(docs))),
            "domains": {k: summary(v) for k, v in sorted(by_domain.items())},
            "files": {d.source: summary([i]) for i, d in enumerate(docs)}}
