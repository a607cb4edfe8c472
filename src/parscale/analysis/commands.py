"""The `parscale` sub-commands that measure: eval, streams, bench, bench-report, cost, fit, predict, plan."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from parscale.cli_support import (
    FUSE_HELP,
    MODEL_HELP,
    QUANTIZE_HELP,
    command,
    maybe_quantize,
    positive_int_list,
    resolve_model,
)


@command
def cmd_bench(args):
    """Measure decode ms/token, prefill time and peak memory on the GPU (random bf16 weights)."""
    from parscale.analysis.bench import run

    run(args.shapes.split(","), args.streams, args.batches, args.lengths, args.engine,
        Path(args.out), kernels=args.kernels, memory_only=args.memory_only, bounded_reads=args.bounded_reads,
        cache_len=args.cache_len, quantize=args.quantize, anchors=args.anchors, padded_prefill=args.padded_prefill,
        fuse=args.fuse, gptfast_model=args.gptfast_model, resume=args.resume, skinny=args.skinny,
        skinny_layers=args.skinny_layers, decode_attention=args.decode_attention, pdl=args.pdl)
    print(f"wrote {args.out}")


@command
def cmd_bench_report(args):
    """Summarise benchmark JSON: the Figure 4 plot and the paper-style headline ratios."""
    from parscale.analysis.bench_report import report

    lengths = {int(v) for v in args.lengths.split(",")} if args.lengths else None
    summary = report(args.latency, args.memory, Path(args.out), lengths)
    for batch, row in summary["headline"].items():
        for metric, v in row.items():
            print(f"{batch:9s} {metric:11s} P1 {v['P1']:.4f}  P8 {v['P8']:.4f}  equal-loss P1 {v['equal_loss_P1']:.4f}"
                  f"  ratio {v['ratio']:.2f}x")
    print(f"wrote {args.out}/summary.json and {args.out}/figure4_measured.png")


def _one_blas_thread() -> None:
    """The law's fits work on vectors of a few dozen numbers, where a second BLAS thread only spins: `fit
    --paper stack` took 4.1 s of wall and 7.8 s of CPU time with it, 3.8 s and 3.7 s without, on 2 cores.
    Takes effect in a process that has not loaded numpy yet (the command line's)."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _law_points(args):
    from parscale.analysis.scaling_law import paper_points, read_points

    if (args.csv is None) == (args.paper is None):
        raise ValueError("give either a CSV file (params,P,loss) or --paper stack|pile")
    return paper_points(args.paper) if args.paper else read_points(args.csv)


@command
def cmd_fit(args):
    """Fit the parallel scaling law (Eq. 5 and the ρ form, Eq. 4) to params,P,loss points."""
    _one_blas_thread()
    from parscale.analysis.scaling_law import bootstrap, fit, k_profile

    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap takes a number of resamples >= 0 (0: none), got {args.bootstrap}")
    if args.out:
        from parscale.io.files import check_output_file

        check_output_file(args.out)  # before the fits and the bootstrap
    points = _law_points(args)
    eq5, eq4 = fit(points, "eq5"), fit(points, "eq4")
    result = {**eq5.as_dict(), "eq5": eq5.as_dict(), "eq4": eq4.as_dict(), "n_points": len(points)}
    result["eq5"]["k_profile"] = profile = k_profile(points, eq5)
    if not profile["identified"]:
        ratios = " / ".join(f"{r:.2f}x" for r in profile["objective_ratio"].values())
        print(f"warning: these points do not determine k: fixing k at half / twice the fit ({eq5.shape:.4g}) raises "
              f"the objective only {ratios} (the paper's fits: 3.3-7.6x); k and its bootstrap interval "
              "reflect the optimiser's starting points more than the data", file=sys.stderr)
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
        from parscale.io.files import write_json_atomic

        write_json_atomic(result, Path(args.out))
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
    """(Eq. 5 fit, the (N, P) range it was fitted on or None): --law's file, the fit shipped for --paper (no
    refit: `parscale fit --paper X --out` writes the same numbers), or a fit of the CSV's points."""
    from parscale.analysis.scaling_law import Fit, fit

    def from_json(d: dict):
        law = d.get("eq5", d)
        f = Fit("eq5", *(float(law[k]) for k in ("E", "A", "alpha", "k")), float(law.get("r2", "nan")), 0.0)
        span = d.get("fitted_range")
        if span is None and isinstance(d.get("table"), list) and d["table"]:
            span = {"params": [min(r["params"] for r in d["table"]), max(r["params"] for r in d["table"])],
                    "P": [min(r["P"] for r in d["table"]), max(r["P"] for r in d["table"])]}
        return f, span

    if args.law:
        try:
            return from_json(json.loads(Path(args.law).read_text()))
        except FileNotFoundError:
            raise ValueError(f"no such file: {args.law}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError,
                ValueError) as e:
            raise ValueError(f"--law {args.law} is not a fit written by `parscale fit --out` (it needs E, A, "
                             f"alpha and k, alone or under 'eq5'; {type(e).__name__}: {e})") from None
    if args.paper:
        from importlib import resources

        shipped = resources.files("parscale.analysis").joinpath("paper_data", f"fit_{args.paper}.json")
        return from_json(json.loads(shipped.read_text()))
    points = _law_points(args)
    span = {"params": [float(points.params.min()), float(points.params.max())],
            "P": [float(points.P.min()), float(points.P.max())]}
    return fit(points, "eq5"), span


def _extrapolation(span, params: float, streams: float) -> list[str]:
    """What lies outside the fitted (N, P) range (a law fitted on P <= 8 says little about P = 578)."""
    if span is None:
        return []
    notes = []
    lo, hi = span["P"]
    if not lo <= streams <= hi:
        notes.append(f"P = {streams:g} is outside the fitted P {lo:g}..{hi:g}")
    lo, hi = span["params"]
    if not lo <= params <= hi:
        notes.append(f"N = {params:.3g} is outside the fitted N {lo:.3g}..{hi:.3g}")
    return notes


@command
def cmd_predict(args):
    """Predicted loss at (N, P), the multiplier k·ln P + 1, the equal-loss P=1 size, the P for a target."""
    _one_blas_thread()
    from parscale.analysis.scaling_law import equivalent_params, multiplier, smallest_P

    if not (math.isfinite(args.params) and args.params > 0) or args.streams < 1:
        raise ValueError(f"--params must be a finite number > 0 and --streams >= 1, got {args.params:g} and "
                         f"{args.streams}")
    if args.target is not None and not (math.isfinite(args.target) and args.target > 0):
        raise ValueError(f"--target is a loss: a finite number > 0, got {args.target:g}")
    f, span = _load_fit(args)
    out = {"params": args.params, "P": args.streams, "loss": float(f.predict(args.params, args.streams)),
           "multiplier": multiplier(f.shape, args.streams),
           "equivalent_P1_params": equivalent_params(f, args.params, args.streams)}
    notes = _extrapolation(span, args.params, args.streams)
    if args.target is not None:
        out["target_loss"] = args.target
        out["smallest_P_for_target"] = best = smallest_P(f, args.params, args.target)
        if best is not None:
            notes += [n for n in _extrapolation(span, args.params, best) if n not in notes]
    out["fitted_range"] = span
    out["extrapolated"] = notes
    print(json.dumps(out, indent=1))
    for note in notes:
        print(f"warning: extrapolation: {note}; the law was not fitted there", file=sys.stderr)


@command
def cmd_plan(args):
    """Candidates (N, P) that fit a GPU's memory and a per-token latency budget, best predicted loss first."""
    _one_blas_thread()
    from parscale.analysis.cost import predict
    from parscale.model.config import PRESETS, ModelConfig

    if not (args.memory_gib > 0 and args.latency_ms > 0):
        raise ValueError(f"--memory-gib and --latency-ms must be > 0, got {args.memory_gib} and {args.latency_ms}")
    f, _ = _load_fit(args)
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

    if args.out:
        from parscale.io.files import check_output_file

        check_output_file(args.out)
    if args.validate_latency is not None or args.validate_memory is not None:
        v = validate(args.validate_latency or [], args.validate_memory or [], args.gpu, args.engine)
        if args.out:
            from parscale.io.files import write_json_atomic

            write_json_atomic(v, Path(args.out))
        print(json.dumps(v["summary"], indent=1))
        return
    cfg = ModelConfig.preset(args.shape, parscale_n=args.streams)
    result = predict(cfg, args.batch, args.input_len, args.output_len, args.gpu, args.engine)
    result["assumed"] = {"shape": args.shape, "P": args.streams, "gpu": args.gpu, "engine": args.engine,
                         "batch": args.batch, "input_len": args.input_len, "output_len": args.output_len,
                         "dtype": "bfloat16"}
    if args.out:
        from parscale.io.files import write_json_atomic

        write_json_atomic(result, Path(args.out))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    gib, mem = 2**30, result["memory"]
    print(f"{args.shape} P = {args.streams} on {args.gpu} ({args.engine} engine, bf16), batch {args.batch}, "
          f"{args.input_len} prompt + {args.output_len} generated tokens; predicted by the analytic cost model "
          f"(parscale/analysis/cost.py, calibrated on measured benchmarks):")
    for label, value in (("decode", f"{result['decode_ms_per_token']:.2f} ms/token"),
                         ("prefill", f"{result['prefill_ms']:.2f} ms"),
                         ("latency", f"{result['latency_s']:.3f} s for the whole request"),
                         ("memory", f"{result['memory_gib']:.2f} GiB (weights {mem['weights'] / gib:.2f}, KV cache "
                                    f"{mem['kv_cache'] / gib:.3f}, activations {mem['activations'] / gib:.3f}, "
                                    f"runtime overhead {mem['overhead'] / gib:.2f})")):
        print(f"  {label:8s} {value}")


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
    model = parscale.load(args.model, dtype=args.dtype, device=args.device)
    if args.adapter:
        from parscale.training.adapter import load_adapter

        model = load_adapter(model, args.adapter)
    model = maybe_quantize(model, args)
    tokenizer = parscale.load_tokenizer(args.model) if not str(args.data).endswith(".bin") else None
    result = evaluate(model, tokenizer, args.data, max_length=args.max_length, stride=args.stride,
                      batch_size=args.batch_size, glob=args.glob, text_field=args.text_field,
                      token_dtype=args.token_dtype)
    result["model"], result["quantize"] = str(args.model), args.quantize
    if args.adapter:
        result["adapter"] = str(args.adapter)
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
    from parscale.analysis.streams import plot_diagnostics, stream_diagnostics, verdict
    from parscale.io.files import check_output_file, write_json_atomic

    for output in (args.out, args.plot):  # before any work
        if output:
            check_output_file(output)
    model = parscale.load(args.model, dtype=args.dtype, device=args.device)
    batches = _held_out_windows(args, model)
    diag = stream_diagnostics(model, batches)
    diag["model"], diag["data"] = str(args.model), str(args.data)
    diag["verdict"], reading = verdict(diag)
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
        print(f"  verdict: {reading}")


def _held_out_windows(args, model):
    """Batches of (x, y) windows evenly spaced over the validation split of a `parscale data` folder, or over
    any text or token shard eval reads."""
    import numpy as np
    import torch

    cfg = model.config
    if args.batches < 1 or args.batch_size < 1:
        raise ValueError(f"--batches and --batch-size must be at least 1, got {args.batches} and {args.batch_size}")
    if not 1 <= args.seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"--seq-len must be between 1 and the model's {cfg.max_position_embeddings} positions, "
                         f"got {args.seq_len}")
    data = Path(args.data)
    if (data / "manifest.json").is_file():
        from parscale.training.data import TokenLoader

        loader = TokenLoader(data, "val", args.batch_size, args.seq_len)
        if loader.manifest["vocab_size"] > cfg.vocab_size:
            raise ValueError(f"{data}'s tokenizer has {loader.manifest['vocab_size']} ids but the model's vocabulary "
                             f"only {cfg.vocab_size}")
        return list(loader.windows(limit=args.batches * args.batch_size))
    import parscale
    from parscale.analysis.evaluate import check_ids, iter_documents

    tokenizer = parscale.load_tokenizer(args.model) if data.suffix != ".bin" else None
    # a token shard's uint16 / uint32 ids become the int64 indices the embedding takes
    ids = np.concatenate([d.ids for d in iter_documents(data, tokenizer, token_dtype=args.token_dtype)]).astype(
        np.int64)
    check_ids(ids, cfg.vocab_size, data)
    n_windows = (len(ids) - 1) // args.seq_len
    n = min(args.batches * args.batch_size, n_windows)
    if n == 0:
        raise ValueError(f"{str(data)!r} holds {len(ids)} tokens: fewer than one window of {args.seq_len + 1}")
    starts = [i * n_windows // n for i in range(n)]  # evenly spaced over the data, as for a data folder
    rows = torch.from_numpy(np.stack([ids[j * args.seq_len : (j + 1) * args.seq_len + 1] for j in starts]))
    return [(rows[i : i + args.batch_size, :-1], rows[i : i + args.batch_size, 1:])
            for i in range(0, n, args.batch_size)]


def add_parsers(sub) -> None:
    """Add this module's sub-commands to the `parscale` parser."""
    p = sub.add_parser("bench", help=cmd_bench.__doc__)
    p.add_argument("--shapes", default="paper-1.6b,paper-2.8b,paper-4.4b", help="comma-separated presets")
    p.add_argument("--streams", type=positive_int_list, default="1,2,4,8", help="comma-separated P (default 1,2,4,8)")
    p.add_argument("--batches", type=positive_int_list, default="1,2,4,8",
                   help="comma-separated batch sizes (default 1,2,4,8)")
    p.add_argument("--lengths", type=positive_int_list, default="64,128,256,512",
                   help="comma-separated input = output lengths (default 64,128,256,512)")
    p.add_argument("--engine", default="graph", choices=["graph", "compile", "plain"],
                   help="decode engine: CUDA graphs, torch.compile, or the plain eager loop")
    p.add_argument("--kernels", action="store_true",
                   help="also record the kernels of one eager decode step ('kernels'), and for every point the "
                        "engine's own step: kernels per step, the GPU's idle time between them and its device time "
                        "by kernel kind ('timeline', analysis/timeline.py)")
    p.add_argument("--memory-only", action="store_true", help="peak memory only (short decode)")
    p.add_argument("--anchors", action="store_true",
                   help="also time transformers' own P = 1 model of each shape (static cache, batch 1, the first "
                        "length) in the same process (anchors.py), recorded under 'anchors'")
    p.add_argument("--gptfast-model", default=None, metavar="PATH",
                   help="also time gpt-fast's plain P = 1 Transformer of each shape (compiled decode step, batch 1, "
                        "the first length) in the same process: PATH is your copy of gpt-fast's model.py, "
                        "imported and run, never copied (anchors.py); recorded under 'anchors'")
    p.add_argument("--bounded-reads", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps read only the written part of the cache (engine.py; default: on for the "
                        "graph engine, off for the compiled one)")
    p.add_argument("--quantize", default=None, choices=["int8"], help=QUANTIZE_HELP)
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None, help=FUSE_HELP)
    p.add_argument("--skinny", action="store_true",
                   help="decode projections and LM head through parscale's few-row Triton matmul "
                        "(inference/skinny_matmul.py) instead of torch's")
    p.add_argument("--skinny-layers", action="store_true",
                   help="--skinny with each layer's RMSNorms, SiLU gate and residual adds folded into the matmul "
                        "kernel: 4 calls and the attention per layer (needs fused projections)")
    p.add_argument("--decode-attention", nargs="?", const="attention", default=None, choices=["attention", "rope"],
                   help="each decode step's attention through parscale's one-kernel Triton attention "
                        "(inference/decode_attention.py) instead of two matmuls and a softmax; `rope`: with RoPE "
                        "and the cache write folded in")
    p.add_argument("--pdl", action="store_true",
                   help="parscale's Triton kernels launched with programmatic dependent launch (Hopper; eager "
                        "launches only, so the graph engine: inference/triton_support.py)")
    p.add_argument("--padded-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="prompts left-padded to 64, 128, ... tokens and prefilled by one CUDA graph per length "
                        "(engine.py; default: on for the graph engine, off for the compiled one)")
    p.add_argument("--cache-len", type=int, default=None,
                   help="cache size in tokens (default: 2 x length), e.g. 4096 for a short talk in a long cache")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--resume", action="store_true",
                   help="continue --out if it exists (same settings, GPU and torch): its points are kept and "
                        "skipped, so a grid cut short is finished by running the same command again")
    p = sub.add_parser("bench-report", help=cmd_bench_report.__doc__)
    p.add_argument("--latency", nargs="+", required=True, help="bench JSON files with timings")
    p.add_argument("--memory", nargs="+", required=True, help="bench JSON files with peak memory")
    p.add_argument("--lengths", default=None, help="only these input = output lengths, e.g. 64 (default: all)")
    p.add_argument("--out", default="benchmarks", help="folder for the report (summary JSON, figures)")
    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", default=None, help="a frozen-backbone adapter folder to put on --model (P = 1)")
    p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
    p.add_argument("--data", required=True, help="text file, folder, JSONL or *.bin token shard")
    p.add_argument("--max-length", type=int, default=None, help="window (default: the model's positions)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--glob", default="**/*.txt", help="files to read in a folder")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--token-dtype", default=None, choices=["uint16", "uint32"],
                   help="of a *.bin token shard (default: its folder's manifest.json, else uint16)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's own)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is a GPU, else cpu)")
    p.add_argument("--quantize", default=None, choices=["int8"], help=QUANTIZE_HELP)
    p.add_argument("--out", default=None, help="write the JSON result here")

    p = sub.add_parser("streams", help=cmd_streams.__doc__)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
    p.add_argument("--data", required=True,
                   help="a `parscale data` folder (its validation split), text/JSONL, or a *.bin token shard")
    p.add_argument("--token-dtype", default=None, choices=["uint16", "uint32"],
                   help="of a *.bin token shard (default: its folder's manifest.json, else uint16)")
    p.add_argument("--batches", type=int, default=8, help="held-out batches to measure the streams on")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's own)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is a GPU, else cpu)")
    p.add_argument("--out", default=None, help="write the diagnostics JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of per-stream loss and hidden cosine here")

    def law_inputs(p):
        p.add_argument("csv", nargs="?", default=None, help="CSV with columns params,P,loss")
        p.add_argument("--paper", choices=["stack", "pile"], default=None, help="the paper's 24 points")

    p = sub.add_parser("fit", help=cmd_fit.__doc__)
    law_inputs(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for confidence intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
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
            p.add_argument("--gpu", default="h200", choices=["h100", "h200", "a100"],
                           help="the GPU the cost model is calibrated for")
            p.add_argument("--engine", default="graph", choices=["graph", "compile"],
                           help="decode engine the cost model describes")
            p.add_argument("--memory-gib", type=float, required=True, help="GPU memory budget in GiB")
            p.add_argument("--latency-ms", type=float, required=True, help="decode budget per token")
            p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
            p.add_argument("--input-len", type=int, default=64, help="prompt tokens")
            p.add_argument("--output-len", type=int, default=128, help="generated tokens")
            p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("cost", help=cmd_cost.__doc__)
    p.add_argument("--shape", default="paper-1.6b", help="a model preset (parscale info lists their sizes)")
    p.add_argument("--streams", type=int, default=1, help="P, the number of parallel streams")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens")
    p.add_argument("--gpu", default="h200", choices=["h100", "h200", "a100"],
                   help="the GPU the cost model is calibrated for")
    p.add_argument("--engine", default="graph", choices=["graph", "compile"],
                   help="decode engine the cost model describes")
    p.add_argument("--validate-latency", nargs="*", default=None, help="measured bench JSON (timings)")
    p.add_argument("--validate-memory", nargs="*", default=None, help="measured bench JSON (peak memory)")
    p.add_argument("--out", default=None, help="also write the result to this JSON file")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
