"""The `parscale` sub-commands of data and training: corpus, data, verify-data, train, demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from parscale.cli_support import add_config_arguments, command


@command
def cmd_corpus(args):
    """Build a filtered, deduplicated Python-code corpus (JSONL + manifest), validation held out by package."""
    import sysconfig

    from parscale.training.corpus import python_corpus

    roots, stdlib = list(args.roots), list(args.stdlib)
    if args.this_python:
        paths = sysconfig.get_paths()
        stdlib.append(paths["stdlib"])
        roots.extend(dict.fromkeys(p for p in (paths["purelib"], paths["platlib"]) if Path(p).is_dir()))
    totals = python_corpus(roots, args.out, val_fraction=args.val_fraction, stdlib_roots=stdlib,
                           overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in totals.items() if k != "val_packages"}, indent=1))


@command
def cmd_data(args):
    """Tokenise text sources into shards + manifest (training a BPE tokenizer unless one is given)."""
    from parscale.io.files import check_writable
    from parscale.training.data import DATA_FILES, build_shards, iter_texts
    from parscale.training.tokenizer import check_vocab_size, train_bpe

    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not 0 < args.bpe_sample <= 1:
        raise ValueError(f"--bpe-sample must be in (0, 1], got {args.bpe_sample}")
    if args.tokenizer is None:
        check_vocab_size(args.vocab_size)
    check_writable(Path(args.out), DATA_FILES, args.overwrite)  # before the long work
    if args.tokenizer:
        import parscale

        tok = parscale.load_tokenizer(args.tokenizer)
    else:
        print(f"[data] training a {args.vocab_size}-token byte-level BPE on the training documents"
              + (f" ({args.bpe_sample:.0%} sample)" if args.bpe_sample < 1 else ""), file=sys.stderr)
        texts = iter_texts(args.sources, glob=args.glob, text_field=args.text_field, split_field=args.split_field,
                           sample=args.bpe_sample, val_fraction=None if args.split_field else args.val_fraction)
        tok = train_bpe(texts, args.vocab_size)
    m = build_shards(args.sources, args.out, tok, glob=args.glob, text_field=args.text_field,
                     val_fraction=args.val_fraction, split_field=args.split_field, overwrite=args.overwrite)
    skipped = f"; {m['skipped_files']} files skipped as not UTF-8 text" if m["skipped_files"] else ""
    held = (f"; no document fell into validation at --val-fraction {args.val_fraction}: held out "
            f"{m['val_held_out_from']}" if m.get("val_held_out_from") else "")
    print(f"wrote {args.out}: {m['train_tokens']:,} train / {m['val_tokens']:,} validation tokens "
          f"({m['train_documents']} / {m['val_documents']} documents, {m['dtype']}){skipped}{held}")


@command
def cmd_verify_data(args):
    """Check a `parscale data` folder: shard sizes, token ids, tokenizer and source files against its manifest."""
    from parscale.training.data import DataError, changed_sources, check_data_folder, shard_hashes_recorded

    manifest = check_data_folder(args.folder, full_hash=True)
    changed = changed_sources(manifest)
    if changed:
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        raise DataError(f"{len(changed)} source files changed since {args.folder} was built ({shown}); "
                        f"the shards hold their old text: rebuild with `parscale data` to use the new one")
    present = sum(Path(f["path"]).is_file() for f in manifest.get("files", []))
    hashes = ("shards (sha256)" if shard_hashes_recorded(manifest) else
              "shard sizes (the manifest records no shard hashes: rebuild with `parscale data` to get them)")
    print(f"{args.folder}: {hashes}, token ids and tokenizer match the manifest; {present} of "
          f"{len(manifest.get('files', []))} source files found here, all unchanged")


def _train_config(args):
    """TrainConfig from (on --resume) the checkpoint's saved settings, then --config, then explicit flags."""
    from parscale.training.run_folder import latest_checkpoint
    from parscale.training.train_config import TrainConfig, load_config_file

    fields = {f for f in TrainConfig.__dataclass_fields__}
    file_settings = load_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    saved = {}
    if args.resume:
        out = flags.get("out", file_settings.get("out", TrainConfig.out))
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ValueError(f"--resume: {str(out)!r} holds no checkpoint to resume from (check --out; a run "
                             f"stopped before its first checkpoint starts over without --resume)")
        try:
            saved = json.loads((ckpt / "train_config.json").read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"--resume: {ckpt / 'train_config.json'} cannot be read ({e}); the checkpoint is "
                             f"damaged") from None
        saved = {k: v for k, v in saved.items() if k in fields}
    return TrainConfig(**{**saved, **file_settings, **flags})


@command
def cmd_train(args):
    """Train a model (preset from scratch, or a checkpoint; P streams) on token shards."""
    import torch.distributed as dist

    from parscale.training.train import TrainingInterrupted, train

    try:
        result = train(_train_config(args), resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stopped:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"\n{stopped}", file=sys.stderr)
        return 128 + stopped.signum
    finally:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result, indent=1))


@command
def cmd_demo(args):
    """The built-in default: stdlib corpus -> BPE -> shards -> train P=1 and P=4 alike -> losses, samples, report."""
    from parscale.demo import run_demo

    run_demo(args.out, steps=args.steps, corpus_mb=args.corpus_mb, vocab_size=args.vocab_size)


def add_parsers(sub) -> None:
    """Add this module's sub-commands to the `parscale` parser."""
    from parscale.training.train_config import TrainConfig

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("--out", default="runs/demo", help="folder for the demo's outputs")
    p.add_argument("--steps", type=int, default=200, help="training steps per model")
    p.add_argument("--corpus-mb", type=int, default=4, help="standard-library source to use (MiB)")
    p.add_argument("--vocab-size", type=int, default=4096, help="entries of the BPE the demo trains")

    p = sub.add_parser("corpus", help=cmd_corpus.__doc__)
    p.add_argument("roots", nargs="*", help="folders of installed packages (site-packages)")
    p.add_argument("--stdlib", action="append", default=[], help="a standard-library folder (packages get 'stdlib:')")
    p.add_argument("--this-python", action="store_true",
                   help="add the running interpreter's standard library and site-packages")
    p.add_argument("--out", required=True, help="the corpus JSONL to write (manifest beside it)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of bytes held out, whole packages")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a corpus parscale wrote at --out (a file it did not write is never replaced)")

    p = sub.add_parser("data", help=cmd_data.__doc__)
    p.add_argument("sources", nargs="+", help="files, folders or JSONL files")
    p.add_argument("--out", required=True, help="the data folder to write (shards, manifest.json, tokenizer.json)")
    p.add_argument("--glob", default="**/*.txt", help="files to read in a folder")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (or a folder holding one)")
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="entries of the BPE trained when no --tokenizer is given")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents held out for validation (by a hash of their path)")
    p.add_argument("--split-field", default=None,
                   help="JSONL field that names each document's split ('train'/'val') instead of hashing")
    p.add_argument("--bpe-sample", type=float, default=1.0,
                   help="share of training documents the BPE is trained on (hash-chosen)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that is not empty (parscale replaces what it wrote, never your files)")

    p = sub.add_parser("verify-data", help=cmd_verify_data.__doc__)
    p.add_argument("folder", help="a folder written by `parscale data` (reads manifest.json, *.bin, tokenizer.json)")

    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("--config", default=None, help="a TOML file of TrainConfig fields; flags override it")
    add_config_arguments(p, TrainConfig)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its saved settings")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run (removes its checkpoints and metrics only)")
