"""The `parscale` sub-commands that run a model: generate and chat."""

from __future__ import annotations

import argparse
import sys
import time

from parscale.cli_support import FUSE_HELP, MODEL_HELP, QUANTIZE_HELP, command, maybe_quantize, resolve_model


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
    maybe_quantize(model, args)
    tok = parscale.load_tokenizer(args.model)
    file_eos = model.generation_config.get("eos_token_id")
    eos = file_eos if file_eos is not None else model.config.eos_token_id
    eos = eos if eos is not None else eos_id(tok)
    return model, tok, [] if eos is None else eos if isinstance(eos, list) else [eos]


def _generation_flags(args) -> dict:
    """generate() settings from the flags; those not given stay None (the model's generation_config decides)."""
    flags = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                 compile=args.compile, padded_prefill=args.padded_prefill)
    if args.temperature is not None:  # --temperature 0 is greedy, any other value samples
        flags["do_sample"] = args.temperature > 0
    return flags


def _stream(model, tok, ids, eos: list[int], flags: dict, skip_ids=(), lead: str = "") -> list[int]:
    """Generate from ids, writing the text to stdout as it comes; returns the new ids. `lead` (the prompt)
    is written with the first new token, so a request that generate refuses prints only its error."""
    import parscale

    produced: list[int] = []
    printed = 0

    def on_token(token):
        nonlocal printed
        if not produced:
            sys.stdout.write(lead)
        produced.append(int(token[0]))
        text = tok.decode([t for t in produced if t not in skip_ids])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    parscale.generate(model, ids, eos_token_id=eos, on_token=on_token, **flags)
    if not produced:
        sys.stdout.write(lead)
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
    produced = _stream(model, tok, ids, eos, _generation_flags(args), lead=args.prompt)
    elapsed = time.perf_counter() - start
    print(f"\n[{len(produced)} tokens in {elapsed:.2f} s, {len(produced) / elapsed:.1f} tokens/s]", file=sys.stderr)


def _fit_conversation(args, tok, messages: list[dict], positions: int):
    """The prompt ids of the conversation in its template, leaving at least one position for the reply: the
    oldest turns (after a system message) are left out, with a note, until it fits; a new message that
    cannot fit alone is dropped with a note (None), and the chat goes on."""
    import torch

    from parscale.inference.chat import apply_chat_template

    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        prompt = apply_chat_template(args.model, messages, add_generation_prompt=True)
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
        if ids.shape[1] < positions:
            return ids
        if len(messages) - first <= 1:
            print(f"[this message makes a prompt of {ids.shape[1]} tokens, more than the model's {positions} "
                  f"positions allow: it is left out; write a shorter one]", file=sys.stderr)
            messages.pop()
            return None
        del messages[first : first + 2]  # the oldest user turn and the reply to it
        print(f"[the conversation is longer than the model's {positions} positions: the oldest turn is left "
              f"out]", file=sys.stderr)


@command
def cmd_chat(args):
    """Chat with an instruct model in its own chat template: one line per turn, replies streamed."""

    from parscale.inference.chat import chat_template, stop_token_ids

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
        ids = _fit_conversation(args, tok, messages, model.config.max_position_embeddings)
        if ids is None:
            continue
        flags = _generation_flags(args)
        room = model.config.max_position_embeddings - ids.shape[1]
        if flags["max_new_tokens"] is not None and flags["max_new_tokens"] > room:
            flags["max_new_tokens"] = room  # the reply ends at the model's last position, as transformers' would
        produced = _stream(model, tok, ids, stops, flags, skip_ids=set(stops))
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": tok.decode([t for t in produced if t not in stops])})


def add_parsers(sub) -> None:
    """Add this module's sub-commands to the `parscale` parser."""
    for name, fn in (("generate", cmd_generate), ("chat", cmd_chat)):
        p = sub.add_parser(name, help=fn.__doc__)
        p.add_argument("--model", required=True, help=MODEL_HELP)
        p.add_argument("--revision", default=None, help="branch, tag or commit when --model is a Hub id (org/name)")
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the text to continue")
        else:
            p.add_argument("--system", default=None, help="a system prompt put first in the conversation")
        p.add_argument("--adapter", default=None, help="a frozen-backbone adapter folder to put on --model")
        unset = " (default: the model's generation_config.json, else %s)"
        p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per reply" + unset % "32")
        p.add_argument("--temperature", type=float, default=None, help="0 = greedy" + unset % "greedy")
        p.add_argument("--top-k", type=int, default=None,
                       help="sample among the k likeliest, 0 for all" + unset % "50, as transformers")
        p.add_argument("--top-p", type=float, default=None, help="nucleus sampling" + unset % "off")
        p.add_argument("--repetition-penalty", type=float, default=None, help="1 = off" + unset % "off")
        p.add_argument("--seed", type=int, default=0, help="seed of the sampling (a run repeats with the same seed)")
        p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's own)")
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is a GPU, else cpu)")
        p.add_argument("--quantize", default=None, choices=["int8"], help=QUANTIZE_HELP)
        p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None, help=FUSE_HELP)
        p.add_argument("--compile", action="store_true",
                       help="compile the decode step with torch.compile (the first reply waits for it)")
        p.add_argument("--padded-prefill", action=argparse.BooleanOptionalAction, default=None,
                       help="prefill the prompt left-padded to 64, 128, ... tokens through one captured graph per "
                            "length (default: on without --compile on a GPU; with --compile it compiles each "
                            "padded length once, ~30 s, for a prefill several times faster)")
