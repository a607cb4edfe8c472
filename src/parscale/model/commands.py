"""The `parscale` sub-commands of model folders: new, info, convert."""

from __future__ import annotations

import json
from pathlib import Path

from parscale.cli_support import MODEL_HELP, command, resolve_model


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
    positions = cfg.max_position_embeddings
    length = min(2048, positions) if args.length is None else args.length
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if not 1 <= length <= positions:
        raise ValueError(f"--length must be between 1 and the model's {positions} positions, got {length}")
    counts = cfg.param_counts()
    elem = torch.finfo(torch.bfloat16).bits // 8 if args.dtype in ("bfloat16", "float16") else 4
    info = {
        "model_type": cfg.model_type, "parscale_n": cfg.parscale_n,
        "parscale_n_tokens": cfg.prefix_len, "parscale_attn_smooth": cfg.parscale_attn_smooth if cfg.parscale_n > 1
        else None, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "tied": cfg.tie_word_embeddings,
        "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
        "params_parscale": counts["parscale"], **_stored(args.model),
        "runtime_dtype": args.dtype, "weights_bytes": weight_bytes(cfg, elem),
        "kv_cache_bytes": kv_cache_bytes(cfg, args.batch, length, elem), "batch": args.batch,
        "length": length, "generation_defaults": read_generation_config(args.model),
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


def _stored(model) -> dict:
    """The dtype the folder's weights are stored in (its config.json) and their size on disk."""
    from parscale.model.checkpoint import model_folder

    folder = model_folder(model)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype")
    return {"stored_dtype": dtype if isinstance(dtype, str) else None,
            "stored_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


# convert's flags for the streams it adds; None on the command line means "not given", so that --adapter (which
# brings its own streams) can refuse any of them, even one given at its default value.
NEW_STREAM_DEFAULTS = {"n_tokens": 48, "smooth": 0.1, "seed": 0, "prefix_init": "random"}


@command
def cmd_convert(args):
    """Give a P=1 checkpoint P streams with fresh prefixes and aggregator; save in the released format.
    A GGUF file (llama / qwen2 / qwen3) becomes a Hugging Face folder, with P streams if --streams > 1.
    With --adapter, the P-stream model a frozen-backbone adapter makes on the P=1 model, saved whole."""
    from parscale.model.gguf import gguf_to_folder, is_gguf

    if args.adapter:
        return _convert_with_adapter(args)
    for name, default in NEW_STREAM_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if is_gguf(args.model):
        out = gguf_to_folder(args.model, args.out, dtype=args.dtype or "float32", streams=args.streams or 1,
                             n_tokens=args.n_tokens, smooth=args.smooth, seed=args.seed, overwrite=args.overwrite,
                             prefix_init=args.prefix_init)
        print(f"wrote {out}: {args.model} dequantised, P={args.streams or 1}")
        return
    if args.streams is None:
        raise ValueError("--streams is required: the number of parallel streams to add (>= 2)")
    resolve_model(args)
    import parscale
    from parscale.model.convert import add_streams

    if Path(args.out).resolve() == Path(args.model).resolve() and not args.overwrite:
        raise ValueError(f"--out {args.out} is the source model's folder: converting in place replaces its P = 1 "
                         f"model; write to another folder, or pass --overwrite to replace it")
    model = parscale.load(args.model)
    new = add_streams(model, args.streams, n_tokens=args.n_tokens, smooth=args.smooth, seed=args.seed,
                      prefix_init=args.prefix_init)
    parscale.save(new, args.out, tokenizer_from=args.model, dtype=args.dtype, overwrite=args.overwrite,
                  base_model=args.model_name)
    c = new.config.param_counts()
    print(f"wrote {args.out}: {new.config.model_type}, P={args.streams}, n_tokens={args.n_tokens}, "
          f"+{c['parscale']:,} ParScale parameters")


def _convert_with_adapter(args):
    """--adapter: backbone + adapter written as one folder (what vLLM, lm-eval or the Hub take as a model)."""
    given = ["--" + name.replace("_", "-") for name in ("streams", *NEW_STREAM_DEFAULTS)
             if getattr(args, name) is not None]
    if given:
        raise ValueError(f"--adapter brings its own streams, prefixes and aggregator: drop {', '.join(given)}")
    resolve_model(args)
    import parscale
    from parscale.training.adapter import load_adapter

    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError(f"--out {args.out} is the backbone's folder: write the adapted model to another folder")
    model = load_adapter(parscale.load(args.model), args.adapter)
    parscale.save(model, args.out, tokenizer_from=args.model, dtype=args.dtype, overwrite=args.overwrite,
                  base_model=args.model_name)
    print(f"wrote {args.out}: {args.model} with the P={model.config.parscale_n} adapter {args.adapter}")


def add_parsers(sub) -> None:
    """Add this module's sub-commands to the `parscale` parser."""
    p = sub.add_parser("new", help=cmd_new.__doc__)
    p.add_argument("--preset", default="tiny",
                   help="model shape: tiny, tiny-llama, tiny-qwen3, demo, small, paper-0.5b ... paper-4.4b")
    p.add_argument("--streams", type=int, default=1, help="P, the number of parallel streams")
    p.add_argument("--n-tokens", type=int, default=None, help="prefix tokens per stream (preset default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--dtype", default=None,
                   help="dtype of the saved weights: float32, bfloat16 or float16 (default: as built / as the source)")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that is not empty (parscale replaces what it wrote, never your files)")

    p = sub.add_parser("info", help=cmd_info.__doc__)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
    p.add_argument("--batch", type=int, default=1, help="sequences, for the KV-cache size")
    p.add_argument("--length", type=int, default=None,
                   help="tokens in the KV cache (prefix excluded; default 2048, or the model's positions if fewer)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the runtime dtype the sizes are computed for (the stored dtype is shown separately)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("convert", help=cmd_convert.__doc__)
    p.add_argument("--model", required=True,
                   help="a P=1 model (qwen2, llama, qwen3) or a GGUF file of one: " + MODEL_HELP)
    p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--adapter", default=None,
                   help="a frozen-backbone adapter folder: write --model (P = 1) with it as one P-stream model")
    p.add_argument("--streams", type=int, default=None,
                   help="P, the number of parallel streams to add (>= 2; for a GGUF file 1 keeps P = 1)")
    p.add_argument("--n-tokens", type=int, default=None, help="prefix tokens per stream and layer (default 48)")
    p.add_argument("--smooth", type=float, default=None,
                   help="ε of the aggregation smoothing w·(1−ε) + ε/P (default 0.1)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random initialisation (default 0)")
    p.add_argument("--prefix-init", choices=["random", "backbone"], default=None,
                   help="new prefixes: random (the default), or the source model's own keys and values of random "
                        "tokens at position 0, which starts a trained model near its P = 1 loss (model/convert.py)")
    p.add_argument("--dtype", default=None,
                   help="dtype of the saved weights: float32, bfloat16 or float16 (default: as built / as the source)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that is not empty (parscale replaces what it wrote, never your files)")
