"""The `parscale` command: one sub-command per job.

    parscale demo                                   the built-in default: train tiny P=1 and P=4 models on the stdlib
    parscale data SOURCES --out DIR                     token shards + manifest (and a BPE tokenizer)
    parscale train --data DIR --out DIR [--streams P]   train, resumable
    parscale new --preset tiny --streams 4 --out DIR    a freshly initialised model folder
    parscale info --model DIR [--batch B --length T]    config, parameter counts, memory
    parscale generate --model DIR --prompt "..."        streamed text
    parscale convert --model SRC --out DST --streams P  give a P=1 checkpoint P streams
    parscale bench --out FILE.json                      measured GPU latency and memory
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


QUANTIZE_HELP = "int8: weight-only int8 projections in every decoder layer (inference/quantize.py)"
MODEL_HELP = ("a model folder, a training run folder (its latest checkpoint) or a Hub id org/name (taken from the "
              "local Hub cache, or downloaded into it; HF_HUB_OFFLINE=1 stays offline)")


def resolve_model(args) -> None:
    """Replace args.model by the local folder it names (a Hub id becomes its cached snapshot), once, so
    every later read (weights, tokenizer, generation and chat files) sees the same files."""
    from parscale.model.checkpoint import model_folder

    args.model_name = args.model
    args.model = str(model_folder(args.model, getattr(args, "revision", None)))


def _human(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


@command
def cmd_new(args):
    """Write a freshly initialised model (named preset, optional P) with a byte-level tokenizer."""
    import parscale
    from parscale.training.tokenizer import byte_tokenizer

    overrides = {"parscale_n": args.streams}
    if args.n_tokens is not None:
        overrides["parscale_n_tokens"] = args.n_tokens
    cfg = parscale.ModelConfig.preset(args.preset, **overrides)
    tok = byte_tokenizer() if cfg.vocab_size >= 257 else None
    if tok is not None:
        cfg = cfg.replace(eos_token_id=256)
    model = parscale.build_model(cfg, seed=args.seed)
    _save_with_tokenizer(model, args.out, tok, args.dtype, args.overwrite)
    print(f"wrote {args.out} ({cfg.model_type}, P={cfg.parscale_n}, {cfg.param_counts()['total']:,} parameters)")


def _save_with_tokenizer(model, out, tokenizer, dtype=None, overwrite=False):
    import tempfile

    import parscale

    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is not None:
            tokenizer.save(str(Path(tmp) / "tokenizer.json"))
        parscale.save(model, out, tokenizer_from=tmp if tokenizer is not None else None, dtype=dtype,
                      overwrite=overwrite)


@command
def cmd_info(args):
    """Print config, P, parameter counts and memory for weights and KV cache."""
    resolve_model(args)
    import torch

    from parscale.analysis.memory import kv_cache_bytes, weight_bytes
    from parscale.model.checkpoint import read_config, read_generation_config

    cfg = read_config(args.model)
    counts = cfg.param_counts()
    elem = torch.finfo(torch.bfloat16).bits // 8 if args.dtype in ("bfloat16", "float16") else 4
    info = {
        "model_type": cfg.model_type, "parscale_n": cfg.parscale_n,
        "parscale_n_tokens": cfg.prefix_len, "parscale_attn_smooth": cfg.parscale_attn_smooth if cfg.parscale_n > 1
        else None, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "tied": cfg.tie_word_embeddings,
        "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
        "params_parscale": counts["parscale"], "dtype": args.dtype,
        "weights_bytes": weight_bytes(cfg, elem),
        "kv_cache_bytes": kv_cache_bytes(cfg, args.batch, args.length, elem), "batch": args.batch,
        "length": args.length, "generation_defaults": read_generation_config(args.model),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        if k.endswith("_bytes"):
            v = f"{v:,} ({_human(v)})"
        elif isinstance(v, int) and not isinstance(v, bool) and v > 9999:
            v = f"{v:,}"
        print(f"{k:24s} {v}")


def _check_generation_flags(args) -> None:
    from parscale.inference.generate import validate_sampling

    validate_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)  # before loading anything
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")


def _load_for_generation(args):
    """The model (with --adapter) and tokenizer of args.model, and the end-of-sequence ids to stop at."""
    import parscale
    from parscale.training.tokenizer import eos_id

    resolve_model(args)
    model = parscale.load(args.model, dtype=args.dtype, device=args.device)
    if args.adapter:
        from parscale.training.adapter import load_adapter

        generation_config = model.generation_config
        model = load_adapter(model, args.adapter)
        model.generation_config = generation_config
    _maybe_quantize(model, args)
    tok = parscale.load_tokenizer(args.model)
    file_eos = model.generation_config.get("eos_token_id")
    eos = file_eos if file_eos is not None else model.config.eos_token_id
    eos = eos if eos is not None else eos_id(tok)
    return model, tok, [] if eos is None else eos if isinstance(eos, list) else [eos]


def _maybe_quantize(model, args):
    if getattr(args, "quantize", None) == "int8":
        from parscale.inference.quantize import quantize_int8

        quantize_int8(model)
    return model


def _generation_flags(args) -> dict:
    """generate() settings from the flags; those not given stay None (the model's generation_config decides)."""
    flags = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.temperature is not None:  # --temperature 0 is greedy, any other value samples
        flags["do_sample"] = args.temperature > 0
    return flags


def _stream(model, tok, ids, eos: list[int], flags: dict, skip_ids=()) -> list[int]:
    """Generate from ids, writing the text to stdout as it comes; returns the new ids."""
    import parscale

    produced: list[int] = []
    printed = 0

    def on_token(token):
        nonlocal printed
        produced.append(int(token[0]))
        text = tok.decode([t for t in produced if t not in skip_ids])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    parscale.generate(model, ids, eos_token_id=eos, on_token=on_token, **flags)
    return produced


@command
def cmd_generate(args):
    """Generate text from a prompt, printing tokens as they come (defaults from generation_config.json)."""
    import torch

    _check_generation_flags(args)
    if not args.prompt:
        raise ValueError("the prompt is empty")
    if any("\udc80" <= ch <= "\udcff" for ch in args.prompt):  # bytes the locale could not decode
        raise ValueError("the prompt is not valid UTF-8 text")
    model, tok, eos = _load_for_generation(args)
    ids = torch.tensor([tok.encode(args.prompt).ids])
    if ids.shape[1] == 0:
        raise ValueError("the prompt encodes to no tokens")
    start = time.perf_counter()
    sys.stdout.write(args.prompt)
    produced = _stream(model, tok, ids, eos, _generation_flags(args))
    elapsed = time.perf_counter() - start
    print(f"\n[{len(produced)} tokens in {elapsed:.2f} s, {len(produced) / elapsed:.1f} tokens/s]", file=sys.stderr)


@command
def cmd_chat(args):
    """Chat with an instruct model in its own chat template: one line per turn, replies streamed."""
    import torch

    from parscale.inference.chat import apply_chat_template, chat_template, stop_token_ids

    _check_generation_flags(args)
    model, tok, eos = _load_for_generation(args)
    chat_template(args.model)  # fail now, not after the first question, if the model has no template
    stops = list(dict.fromkeys(eos + stop_token_ids(args.model, tok, model.generation_config)))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = apply_chat_template(args.model, messages, add_generation_prompt=True)
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
        produced = _stream(model, tok, ids, stops, _generation_flags(args), skip_ids=set(stops))
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": tok.decode([t for t in produced if t not in stops])})


@command
def cmd_convert(args):
    """Give a P=1 checkpoint P streams with fresh prefixes and aggregator; save in the released format."""
    resolve_model(args)
    import parscale
    from parscale.model.convert import add_streams

    model = parscale.load(args.model)
    new = add_streams(model, args.streams, n_tokens=args.n_tokens, smooth=args.smooth, seed=args.seed)
    parscale.save(new, args.out, tokenizer_from=args.model, dtype=args.dtype, overwrite=args.overwrite,
                  base_model=args.model_name)
    c = new.config.param_counts()
    print(f"wrote {args.out}: {new.config.model_type}, P={args.streams}, n_tokens={args.n_tokens}, "
          f"+{c['parscale']:,} ParScale parameters")


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
    totals = python_corpus(roots, args.out, val_fraction=args.val_fraction, stdlib_roots=stdlib)
    print(json.dumps({k: v for k, v in totals.items() if k != "val_packages"}, indent=1))


@command
def cmd_data(args):
    """Tokenise text sources into shards + manifest (training a BPE tokenizer unless one is given)."""
    from parscale.io.files import check_writable
    from parscale.training.data import DATA_FILES, build_shards, iter_texts
    from parscale.training.tokenizer import train_bpe

    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not 0 < args.bpe_sample <= 1:
        raise ValueError(f"--bpe-sample must be in (0, 1], got {args.bpe_sample}")
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
    print(f"wrote {args.out}: {m['train_tokens']:,} train / {m['val_tokens']:,} validation tokens "
          f"({m['train_documents']} / {m['val_documents']} documents, {m['dtype']}){skipped}")


@command
def cmd_verify_data(args):
    """Check a `parscale data` folder: shard sizes, token ids, tokenizer and source files against its manifest."""
    from parscale.training.data import DataError, changed_sources, check_data_folder

    manifest = check_data_folder(args.folder)
    changed = changed_sources(manifest)
    if changed:
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        raise DataError(f"{len(changed)} source files changed since {args.folder} was built ({shown}); "
                        f"the shards hold their old text: rebuild with `parscale data` to use the new one")
    present = sum(Path(f["path"]).is_file() for f in manifest.get("files", []))
    print(f"{args.folder}: shards, token ids and tokenizer match the manifest; {present} of "
          f"{len(manifest.get('files', []))} source files found here, all unchanged")


def _train_config(args):
    """TrainConfig from (on --resume) the checkpoint's saved settings, then --config, then explicit flags."""
    from parscale.training.run_folder import latest_checkpoint
    from parscale.training.train import TrainConfig, load_config_file

    fields = {f for f in TrainConfig.__dataclass_fields__}
    file_settings = load_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    saved = {}
    if args.resume:
        out = flags.get("out", file_settings.get("out", TrainConfig.out))
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ValueError(f"--resume: {str(out)!r} holds no checkpoint to resume from (check --out)")
        saved = {k: v for k, v in json.loads((ckpt / "train_config.json").read_text()).items() if k in fields}
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


@command
def cmd_bench(args):
    """Measure decode ms/token, prefill time and peak memory on the GPU (random bf16 weights)."""
    from parscale.analysis.bench import run

    def ints(text):
        return [int(x) for x in text.split(",")]

    run(args.shapes.split(","), ints(args.streams), ints(args.batches), ints(args.lengths), args.engine,
        Path(args.out), kernels=args.kernels, memory_only=args.memory_only, bounded_reads=args.bounded_reads,
        cache_len=args.cache_len, quantize=args.quantize)
    print(f"wrote {args.out}")


@command
def cmd_bench_report(args):
    """Summarise benchmark JSON: the Figure 4 plot and the paper-style headline ratios."""
    from parscale.analysis.bench_report import report

    summary = report(args.latency, args.memory, Path(args.out))
    for batch, row in summary["headline"].items():
        for metric, v in row.items():
            print(f"{batch:9s} {metric:11s} P1 {v['P1']:.4f}  P8 {v['P8']:.4f}  equal-loss P1 {v['equal_loss_P1']:.4f}"
                  f"  ratio {v['ratio']:.2f}x")
    print(f"wrote {args.out}/summary.json and {args.out}/figure4_measured.png")


def _law_points(args):
    from parscale.analysis.scaling_law import paper_points, read_points

    if (args.csv is None) == (args.paper is None):
        raise ValueError("give either a CSV file (params,P,loss) or --paper stack|pile")
    return paper_points(args.paper) if args.paper else read_points(args.csv)


@command
def cmd_fit(args):
    """Fit the parallel scaling law (Eq. 5 and the ρ form, Eq. 4) to params,P,loss points."""
    from parscale.analysis.scaling_law import bootstrap, fit

    points = _law_points(args)
    eq5, eq4 = fit(points, "eq5"), fit(points, "eq4")
    result = {**eq5.as_dict(), "eq5": eq5.as_dict(), "eq4": eq4.as_dict(), "n_points": len(points)}
    if args.bootstrap > 0:
        result["eq5"]["ci95"] = bootstrap(points, eq5, n=args.bootstrap, seed=args.seed)
    pred = eq5.predict(points.params, points.P)
    result["table"] = [{"params": int(n), "P": int(p), "loss": float(y), "pred": float(q), "error": float(q - y)}
                       for n, p, y, q in zip(points.params, points.P, points.loss, pred, strict=True)]
    if args.plot:
        from parscale.analysis.plots import plot_contours, plot_law

        stem = Path(args.plot)
        stem.parent.mkdir(parents=True, exist_ok=True)
        plot_law(points, eq5, stem.with_name(stem.name + "_law.png"))
        plot_contours(eq5, stem.with_name(stem.name + "_contours.png"),
                      n_range=(points.params.min() / 2, points.params.max() * 2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return
    for name, f in (("Eq. 5", eq5), ("Eq. 4", eq4)):
        extra = "k" if f.form == "eq5" else "rho"
        print(f"{name}: E={f.E:.4f}  A={f.A:.4g}  alpha={f.alpha:.4f}  {extra}={f.shape:.4f}  R2={f.r2:.4f}")
    if "ci95" in result["eq5"]:
        ci = result["eq5"]["ci95"]
        print(f"  95% bootstrap intervals ({ci['n']} resamples): " + ", ".join(
            f"{k} [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" for k in ("E", "A", "alpha", "k")))
    print(f"{'params':>14} {'P':>3} {'loss':>8} {'pred':>8} {'error':>8}")
    for r in result["table"]:
        print(f"{r['params']:>14,} {r['P']:>3} {r['loss']:>8.4f} {r['pred']:>8.4f} {r['error']:>+8.4f}")


def _load_fit(args):
    from parscale.analysis.scaling_law import Fit, fit

    if args.law:
        d = json.loads(Path(args.law).read_text())
        d = d.get("eq5", d)
        return Fit("eq5", d["E"], d["A"], d["alpha"], d["k"], d.get("r2", float("nan")), 0.0)
    return fit(_law_points(args), "eq5")


@command
def cmd_predict(args):
    """Predicted loss at (N, P), the multiplier k·ln P + 1, the equal-loss P=1 size, the P for a target."""
    from parscale.analysis.scaling_law import equivalent_params, multiplier, smallest_P

    if args.params <= 0 or args.streams < 1:
        raise ValueError("--params must be > 0 and --streams >= 1")
    f = _load_fit(args)
    out = {"params": args.params, "P": args.streams, "loss": float(f.predict(args.params, args.streams)),
           "multiplier": multiplier(f.shape, args.streams),
           "equivalent_P1_params": equivalent_params(f, args.params, args.streams)}
    if args.target is not None:
        out["target_loss"] = args.target
        out["smallest_P_for_target"] = smallest_P(f, args.params, args.target)
    print(json.dumps(out, indent=1))


@command
def cmd_plan(args):
    """Candidates (N, P) that fit a GPU's memory and a per-token latency budget, best predicted loss first."""
    from parscale.analysis.cost import predict
    from parscale.model.config import PRESETS, ModelConfig

    f = _load_fit(args)
    rows = []
    for name in sorted(k for k in PRESETS if k.startswith("paper-")):
        for p in (1, 2, 4, 8):
            cfg = ModelConfig.preset(name, parscale_n=p)
            cost = predict(cfg, args.batch, args.input_len, args.output_len, args.gpu, args.engine)
            n = cfg.param_counts()["non_embedding"]
            fits = cost["memory_gib"] <= args.memory_gib and cost["decode_ms_per_token"] <= args.latency_ms
            rows.append({"shape": name, "P": p, "params": n, "loss": float(f.predict(n, p)),
                         "memory_gib": cost["memory_gib"], "decode_ms_per_token": cost["decode_ms_per_token"],
                         "fits": fits})
    ok = sorted((r for r in rows if r["fits"]), key=lambda r: r["loss"])
    if args.json:
        print(json.dumps({"best": ok[0] if ok else None, "candidates": ok, "all": rows}, indent=1))
        return
    print(f"budget: {args.memory_gib} GiB, {args.latency_ms} ms/token on {args.gpu} ({args.engine} engine), "
          f"batch {args.batch}, {args.input_len}+{args.output_len} tokens")
    print(f"{'shape':>12} {'P':>2} {'N':>14} {'loss':>7} {'GiB':>7} {'ms/tok':>7}")
    for r in ok:
        print(f"{r['shape']:>12} {r['P']:>2} {r['params']:>14,} {r['loss']:>7.4f} {r['memory_gib']:>7.2f} "
              f"{r['decode_ms_per_token']:>7.2f}")
    print(f"best: {ok[0]['shape']} P={ok[0]['P']} (predicted loss {ok[0]['loss']:.4f})" if ok
          else "no candidate fits the budget")


@command
def cmd_cost(args):
    """Predicted memory and latency (analytic model); --validate compares it with measured JSON."""
    from parscale.analysis.cost import predict, validate
    from parscale.model.config import ModelConfig

    if args.validate_latency or args.validate_memory:
        v = validate(args.validate_latency or [], args.validate_memory or [], args.gpu, args.engine)
        if args.out:
            Path(args.out).write_text(json.dumps(v, indent=1) + "\n")
        print(json.dumps(v["summary"], indent=1))
        return
    cfg = ModelConfig.preset(args.shape, parscale_n=args.streams)
    print(json.dumps(predict(cfg, args.batch, args.input_len, args.output_len, args.gpu, args.engine), indent=1))


@command
def cmd_eval(args):
    """Held-out loss, perplexity and bits per byte on text files, JSONL or token shards."""
    resolve_model(args)
    import parscale
    from parscale.analysis.evaluate import check_window_settings, evaluate
    from parscale.model.checkpoint import read_config

    positions = read_config(args.model).max_position_embeddings
    check_window_settings(positions, args.max_length, args.stride, args.batch_size)  # before any work
    if args.out:
        from parscale.io.files import check_output_file

        check_output_file(args.out)
    model = _maybe_quantize(parscale.load(args.model, dtype=args.dtype, device=args.device), args)
    tokenizer = parscale.load_tokenizer(args.model) if not str(args.data).endswith(".bin") else None
    result = evaluate(model, tokenizer, args.data, max_length=args.max_length, stride=args.stride,
                      batch_size=args.batch_size, glob=args.glob, text_field=args.text_field,
                      token_dtype=args.token_dtype)
    result["model"], result["quantize"] = str(args.model), args.quantize
    if args.out:
        from parscale.io.files import write_json_atomic

        write_json_atomic(result, Path(args.out))
    bpb = f", {result['bits_per_byte']:.4f} bits/byte" if result["bits_per_byte"] is not None else ""
    print(f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}{bpb} over {result['tokens']:,} tokens "
          f"(window {result['max_length']}, stride {result['stride']})")
    for name, d in result["domains"].items():
        print(f"  {name}: loss {d['loss']:.4f} over {d['tokens']:,} tokens")


@command
def cmd_streams(args):
    """Stream diagnostics on held-out data: each stream alone, the mix, the ensemble, KL, cosine, weights."""
    resolve_model(args)
    import parscale
    from parscale.analysis.streams import plot_diagnostics, stream_diagnostics
    from parscale.io.files import write_json_atomic

    model = parscale.load(args.model, dtype=args.dtype, device=args.device)
    batches = _held_out_windows(args, model)
    diag = stream_diagnostics(model, batches)
    diag["model"], diag["data"] = str(args.model), str(args.data)
    if args.out:
        write_json_atomic(diag, Path(args.out))
    if args.plot and diag["parscale_n"] > 1:
        plot_diagnostics(diag, args.plot)
    print(f"P={diag['parscale_n']}: loss {diag['loss_mix']:.4f} over {diag['tokens']:,} tokens")
    if diag["parscale_n"] > 1:
        print("  each stream alone: " + ", ".join(f"{v:.4f}" for v in diag["loss_stream"]))
        print(f"  uniform ensemble {diag['loss_ensemble']:.4f}; all streams with stream 0's prefix "
              f"{diag['loss_shared_prefix']:.4f}")
        print(f"  KL between streams {diag['kl_mean']:.4f} nats; hidden cosine (last layer) "
              f"{diag['hidden_cosine'][-1]:.3f}; weight entropy {diag['weight_entropy']:.3f} of "
              f"{diag['weight_entropy_uniform']:.3f}; at floor {diag['floor_share']:.1%}, "
              f"at cap {diag['cap_share']:.1%}")


def _held_out_windows(args, model):
    """Batches of (x, y) windows: the validation split of a `parscale data` folder, or any text eval reads."""
    import numpy as np
    import torch

    data = Path(args.data)
    if (data / "manifest.json").is_file():
        from parscale.training.data import TokenLoader

        loader = TokenLoader(data, "val", args.batch_size, args.seq_len)
        return list(loader.windows(limit=args.batches * args.batch_size))
    import parscale
    from parscale.analysis.evaluate import iter_documents

    ids = np.concatenate([d.ids for d in iter_documents(data, parscale.load_tokenizer(args.model))])
    n = min(args.batches * args.batch_size, (len(ids) - 1) // args.seq_len)
    if n == 0:
        raise ValueError(f"{str(data)!r} holds {len(ids)} tokens: fewer than one window of {args.seq_len + 1}")
    rows = torch.from_numpy(np.stack([ids[i * args.seq_len : (i + 1) * args.seq_len + 1] for i in range(n)]))
    return [(rows[i : i + args.batch_size, :-1], rows[i : i + args.batch_size, 1:])
            for i in range(0, n, args.batch_size)]


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the convention this package's configs follow)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for field, doc in zip(body, body[1:], strict=False):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def add_config_arguments(parser, cls) -> None:
    """One flag per field of a config dataclass (--field-name), typed from its default, documented by its
    docstring. Flags default to None, so a --config file (or a resumed run's saved settings) is only
    overridden by flags given on the command line. Dict fields are set in the config file only."""
    import dataclasses

    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flag, shown = "--" + f.name.replace("_", "-"), f" (default: {default})"
        help_text = (docs.get(f.name, "") + shown).replace("%", "%%")  # argparse formats help with %
        if isinstance(default, dict) or "dict" in str(f.type):
            continue
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, dest=f.name, type=float, nargs="+", default=None, help=help_text)
        else:
            kind = next((t for t in (int, float, str) if t.__name__ in str(f.type)), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from parscale.training.train import TrainConfig

    ap = argparse.ArgumentParser(prog="parscale", description="Parallel scaling (ParScale) for language models.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("--out", default="runs/demo", help="folder for the demo's outputs")
    p.add_argument("--steps", type=int, default=200, help="training steps per model")
    p.add_argument("--corpus-mb", type=int, default=4, help="standard-library source to use (MiB)")
    p.add_argument("--vocab-size", type=int, default=4096)

    p = sub.add_parser("corpus", help=cmd_corpus.__doc__)
    p.add_argument("roots", nargs="*", help="folders of installed packages (site-packages)")
    p.add_argument("--stdlib", action="append", default=[], help="a standard-library folder (packages get 'stdlib:')")
    p.add_argument("--this-python", action="store_true",
                   help="add the running interpreter's standard library and site-packages")
    p.add_argument("--out", required=True, help="the corpus JSONL to write (manifest beside it)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of bytes held out, whole packages")

    p = sub.add_parser("data", help=cmd_data.__doc__)
    p.add_argument("sources", nargs="+", help="files, folders or JSONL files")
    p.add_argument("--out", required=True)
    p.add_argument("--glob", default="**/*.txt")
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (or a folder holding one)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--split-field", default=None,
                   help="JSONL field that names each document's split ('train'/'val') instead of hashing")
    p.add_argument("--bpe-sample", type=float, default=1.0,
                   help="share of training documents the BPE is trained on (hash-chosen)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder holding other files (only the data folder's own files are replaced)")

    p = sub.add_parser("verify-data", help=cmd_verify_data.__doc__)
    p.add_argument("folder", help="a folder written by `parscale data` (reads manifest.json, *.bin, tokenizer.json)")

    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("--config", default=None, help="a TOML file of TrainConfig fields; flags override it")
    add_config_arguments(p, TrainConfig)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its saved settings")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run (removes its checkpoints and metrics only)")

    p = sub.add_parser("new", help=cmd_new.__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--streams", type=int, default=1, help="P, the number of parallel streams")
    p.add_argument("--n-tokens", type=int, default=None, help="prefix tokens per stream (preset default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder holding other files (only the model's own files are replaced)")

    p = sub.add_parser("info", help=cmd_info.__doc__)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=2048, help="tokens in the KV cache (prefix excluded)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", action="store_true")

    for name, fn in (("generate", cmd_generate), ("chat", cmd_chat)):
        p = sub.add_parser(name, help=fn.__doc__)
        p.add_argument("--model", required=True, help=MODEL_HELP)
        p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
        if name == "generate":
            p.add_argument("--prompt", required=True)
        else:
            p.add_argument("--system", default=None, help="a system prompt put first in the conversation")
        p.add_argument("--adapter", default=None, help="a frozen-backbone adapter folder to put on --model")
        unset = " (default: the model's generation_config.json, else %s)"
        p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per reply" + unset % "32")
        p.add_argument("--temperature", type=float, default=None, help="0 = greedy" + unset % "greedy")
        p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest" + unset % "off")
        p.add_argument("--top-p", type=float, default=None, help="nucleus sampling" + unset % "off")
        p.add_argument("--repetition-penalty", type=float, default=None, help="1 = off" + unset % "off")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", default=None)
        p.add_argument("--device", default=None)
        p.add_argument("--quantize", default=None, choices=["int8"], help=QUANTIZE_HELP)

    p = sub.add_parser("convert", help=cmd_convert.__doc__)
    p.add_argument("--model", required=True, help="a P=1 model (qwen2, llama, qwen3): " + MODEL_HELP)
    p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
    p.add_argument("--out", required=True)
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--n-tokens", type=int, default=48)
    p.add_argument("--smooth", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder holding other files (only the model's own files are replaced)")
    p = sub.add_parser("bench", help=cmd_bench.__doc__)
    p.add_argument("--shapes", default="paper-1.6b,paper-2.8b,paper-4.4b", help="comma-separated presets")
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--lengths", default="64,128,256,512", help="input = output lengths")
    p.add_argument("--engine", default="graph", choices=["graph", "compile", "plain"])
    p.add_argument("--kernels", action="store_true", help="also record the kernels of one decode step")
    p.add_argument("--memory-only", action="store_true", help="peak memory only (short decode)")
    p.add_argument("--bounded-reads", action="store_true",
                   help="decode steps read only the written part of the cache (engine.py, bounded_reads)")
    p.add_argument("--quantize", default=None, choices=["int8"], help=QUANTIZE_HELP)
    p.add_argument("--cache-len", type=int, default=None,
                   help="cache size in tokens (default: 2 x length), e.g. 4096 for a short talk in a long cache")
    p.add_argument("--out", required=True)
    p = sub.add_parser("bench-report", help=cmd_bench_report.__doc__)
    p.add_argument("--latency", nargs="+", required=True, help="bench JSON files with timings")
    p.add_argument("--memory", nargs="+", required=True, help="bench JSON files with peak memory")
    p.add_argument("--out", default="benchmarks")
    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
    p.add_argument("--data", required=True, help="text file, folder, JSONL or *.bin token shard")
    p.add_argument("--max-length", type=int, default=None, help="window (default: the model's positions)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--glob", default="**/*.txt", help="files to read in a folder")
    p.add_argument("--text-field", default="text")
    p.add_argument("--token-dtype", default="uint16", choices=["uint16", "uint32"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--quantize", default=None, choices=["int8"], help=QUANTIZE_HELP)
    p.add_argument("--out", default=None, help="write the JSON result here")

    p = sub.add_parser("streams", help=cmd_streams.__doc__)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
    p.add_argument("--data", required=True, help="a `parscale data` folder (its validation split) or text/JSONL")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the diagnostics JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of per-stream loss and hidden cosine here")

    def law_inputs(p):
        p.add_argument("csv", nargs="?", default=None, help="CSV with columns params,P,loss")
        p.add_argument("--paper", choices=["stack", "pile"], default=None, help="the paper's 24 points")

    p = sub.add_parser("fit", help=cmd_fit.__doc__)
    law_inputs(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for confidence intervals (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="file stem: writes STEM_law.png and STEM_contours.png")
    p.add_argument("--out", default=None, help="also write the JSON here")

    for name, fn in (("predict", cmd_predict), ("plan", cmd_plan)):
        p = sub.add_parser(name, help=fn.__doc__)
        law_inputs(p)
        p.add_argument("--law", default=None, help="a JSON written by `parscale fit --out`")
        if name == "predict":
            p.add_argument("--params", type=float, required=True, help="non-embedding parameters N")
            p.add_argument("--streams", type=int, required=True, help="P")
            p.add_argument("--target", type=float, default=None, help="a target loss")
        else:
            p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100"])
            p.add_argument("--engine", default="graph", choices=["graph", "compile"])
            p.add_argument("--memory-gib", type=float, required=True)
            p.add_argument("--latency-ms", type=float, required=True, help="decode budget per token")
            p.add_argument("--batch", type=int, default=1)
            p.add_argument("--input-len", type=int, default=64)
            p.add_argument("--output-len", type=int, default=128)
            p.add_argument("--json", action="store_true")

    p = sub.add_parser("cost", help=cmd_cost.__doc__)
    p.add_argument("--shape", default="paper-1.6b")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100"])
    p.add_argument("--engine", default="graph", choices=["graph", "compile"])
    p.add_argument("--validate-latency", nargs="*", default=None, help="measured bench JSON (timings)")
    p.add_argument("--validate-memory", nargs="*", default=None, help="measured bench JSON (peak memory)")
    p.add_argument("--out", default=None)
    return ap


def main(argv=None) -> int:
    """Run one command. Bad input exits 2 with one `error:` line; a closed output pipe (`| head`) exits
    quietly; Ctrl-C outside training (which checkpoints and says how to resume) exits 130."""
    args = build_parser().parse_args(argv)
    from parscale.model.checkpoint import CheckpointError
    from parscale.training.train import TrainingDiverged

    try:
        code = COMMANDS[args.command](args)
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, OSError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    return code or 0


def _quiet_stdout() -> None:
    """The reader of stdout went away: point stdout at /dev/null so the interpreter's final flush is silent."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
