"""The built-in default job (`parscale demo`): the running Python's standard library as a corpus, a BPE,
token shards, then a tiny P = 1 and a tiny P = 4 model trained alike, their held-out losses, samples,
`report.json` and `loss.png`. About 2 minutes on 2 CPU cores, no download.

The output folder is the demo's own: it refuses a folder holding anything parscale did not write
(io/ownership.py) and on a rerun replaces its own corpus/, data/, p1/, p4/, report.json and loss.png.
"""

from __future__ import annotations

import json
import re
import sys
import sysconfig
from pathlib import Path

import torch

import parscale
from parscale.io.files import real_target, write_json_atomic
from parscale.io.ownership import FolderInUseError, describe, foreign_entries, record, remove_owned
from parscale.training.data import build_shards
from parscale.training.tokenizer import check_vocab_size, train_bpe
from parscale.training.train import TrainConfig, train


def readable(text: str) -> str:
    """A sample as printed: runs of blank lines squeezed to one (a model this small often writes dozens),
    trailing space dropped; report.json keeps the text as generated."""
    squeezed = re.sub(r"\n[ \t]*(\n[ \t]*)+", "\n\n", text).rstrip()
    blank = text.count("\n") - squeezed.count("\n")
    return squeezed + (f"\n[{blank} more blank lines left out]" if blank > 2 else "")


def stdlib_sources(limit_bytes: int) -> list[Path]:
    """Python files of the running interpreter's standard library (no tests), up to limit_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        # Tests, vendored packages and generated tables (codec maps, pydoc topics) are left out.
        if any(part in ("test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "lib2to3")
               for part in rel):
            continue
        size = f.stat().st_size
        if total + size > limit_bytes:
            continue
        chosen.append(f)
        total += size
    return chosen


def run_demo(out, steps: int = 200, corpus_mb: int = 4, vocab_size: int = 4096) -> dict:
    if steps < 1 or corpus_mb < 1:  # before anything is written
        raise ValueError(f"--steps and --corpus-mb must be at least 1, got {steps} and {corpus_mb}")
    check_vocab_size(vocab_size)
    out = real_target(out)
    if out.is_dir():  # the demo's folder is its own: every entry in it must be one an earlier demo wrote
        foreign = foreign_entries(out)
        if foreign:
            raise FolderInUseError(f"{str(out)!r} holds files parscale did not write ({describe(foreign)}); "
                                   f"the demo replaces its whole folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus"
    remove_owned(out, "corpus")
    corpus.mkdir()
    record(out, ["corpus"])
    files = stdlib_sources(corpus_mb * 2**20)
    for f in files:  # one flat folder of the chosen files, named by their path in the stdlib
        (corpus / "__".join(f.parts[-3:])).write_text(f.read_text(encoding="utf-8", errors="replace"))
    print(f"[demo] corpus: {len(files)} standard-library files of Python {sys.version.split()[0]} in {corpus}")
    texts = [p.read_text() for p in sorted(corpus.glob("*.py"))]
    tok = train_bpe(texts, vocab_size)
    manifest = build_shards([corpus], out / "data", tok, glob="*.py", val_fraction=0.1, overwrite=True)
    record(out, ["data"])
    print(f"[demo] {manifest['train_tokens']:,} training / {manifest['val_tokens']:,} validation tokens")
    report = {"corpus_files": len(files), "train_tokens": manifest["train_tokens"],
              "val_tokens": manifest["val_tokens"], "vocab_size": tok.get_vocab_size(), "runs": {}}
    prompt = "def "
    for p in (1, 4):
        cfg = TrainConfig(model="demo", streams=p, data=str(out / "data"), out=str(out / f"p{p}"), steps=steps,
                          batch_size=16, seq_len=128, lr=3e-3, warmup=20, eval_every=max(1, steps // 5),
                          eval_batches=8, save_every=0, seed=0)
        result = train(cfg, overwrite=True)
        record(out, [f"p{p}"])
        model = parscale.load(result["checkpoint"])
        ids = torch.tensor([tok.encode(prompt).ids])
        new = parscale.generate(model, ids, max_new_tokens=48, eos_token_id=manifest["eos_id"])
        sample = tok.decode(new[0].tolist())
        counts = model.config.param_counts()
        report["runs"][f"P={p}"] = {"val_loss": result["val_loss"], "seconds": result["seconds"],
                                    "tokens": result["tokens"], "params_non_embedding": counts["non_embedding"],
                                    "sample": prompt + sample}
        print(f"[demo] P={p}: held-out loss {result['val_loss']:.4f} after {result['tokens']:,} tokens "
              f"({result['seconds']:.0f} s); sample:\n{readable(prompt + sample)}\n")
    _plot(out, report)
    write_json_atomic(report, out / "report.json")
    record(out, ["loss.png", "report.json"])
    print(f"[demo] report: {out / 'report.json'}, plot: {out / 'loss.png'}")
    return report


def _plot(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in report["runs"]:
        rows = [json.loads(line) for line in (out / f"p{name[2:]}" / "metrics.jsonl").read_text().splitlines()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=f"{name} train")
        ev = [r for r in rows if "val_loss" in r]
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o--", label=f"{name} held-out")
    ax.set_xlabel("training step (16 × 128 tokens)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("parscale demo: P = 1 and P = 4 trained alike", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
