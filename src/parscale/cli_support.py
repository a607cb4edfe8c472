"""What every `parscale` sub-command module shares: the command registry and the common options."""

from __future__ import annotations

import argparse

COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


QUANTIZE_HELP = ("int8: weight-only int8 projections in every decoder layer (inference/quantize.py); it saves "
                 "memory (-42%%) but makes a decode step slower (measured at the 1.6B shape on an H200: 2x on the "
                 "graph engine; compiled 1.17x at P = 1 and 5.4x at P = 8)")
MODEL_HELP = ("a model folder, a training run folder (its latest checkpoint) or a Hub id org/name (taken from the "
              "local Hub cache, or downloaded into it; HF_HUB_OFFLINE=1 stays offline)")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already speaks of its default or there is
    none to show (None, False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS or default == []):
            return text
        return text + " (default: %(default)s)"


def positive_int_list(text: str) -> list[int]:
    """argparse type for comma-separated counts ("1,2,4,8"): one usage error naming the bad item."""
    items = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not an integer (give e.g. 1,2,4,8)") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} in {text!r} must be >= 1")
        items.append(value)
    return items


def resolve_model(args) -> None:
    """Replace args.model by the local folder it names (a Hub id becomes its cached snapshot), once, so
    every later read (weights, tokenizer, generation and chat files) sees the same files."""
    from parscale.model.checkpoint import model_folder

    args.model_name = args.model
    args.model = str(model_folder(args.model, getattr(args, "revision", None)))


FUSE_HELP = ("one matmul for each layer's q/k/v and one for gate/up (inference/fuse.py); the same function, "
             "the weights stay in the released format on disk (default: on, unless --quantize; measured "
             "7-17%% faster per token on an H200, benchmarks/README.md)")


def maybe_quantize(model, args):
    """Apply --quantize and --fuse (each refuses the other) to a loaded model."""
    if getattr(args, "quantize", None) == "int8":
        from parscale.inference.quantize import quantize_int8

        quantize_int8(model)
    from parscale.inference.fuse import fuse_wanted

    if fuse_wanted(getattr(args, "fuse", False), getattr(args, "quantize", None)):
        from parscale.inference.fuse import fuse_projections

        fuse_projections(model)
    return model


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
        flag, doc = "--" + f.name.replace("_", "-"), docs.get(f.name, "")
        shown = "" if "default" in doc.lower() else f" (default: {default})"  # a doc may say it in words already
        help_text = (doc + shown).replace("%", "%%")  # argparse formats help with %
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
