"""The `parscale` command: one sub-command per job, each defined next to the modules it drives.

    parscale demo                                       the built-in default: tiny P=1 and P=4 models on the stdlib
    parscale corpus | data | verify-data | train        data and training          (training/commands.py)
    parscale new | info | convert                       model folders              (model/commands.py)
    parscale generate | chat                            running a model            (inference/commands.py)
    parscale eval | streams | bench | bench-report | cost | fit | predict | plan
                                                        measuring                  (analysis/commands.py)

`parscale CMD --help` lists what each one reads and writes.
"""

from __future__ import annotations

import argparse
import sys

from parscale.analysis import commands as analysis_commands
from parscale.cli_support import COMMANDS, DefaultsHelpFormatter
from parscale.errors import TrainingDiverged
from parscale.inference import commands as inference_commands
from parscale.model import commands as model_commands
from parscale.training import commands as training_commands

__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="parscale", description="Parallel scaling (ParScale) for language models.")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in (training_commands, model_commands, inference_commands, analysis_commands):
        module.add_parsers(sub)
    for command in sub.choices.values():  # every option's help shows its default (cli_support)
        command.formatter_class = DefaultsHelpFormatter
    return ap


def main(argv=None) -> int:
    """Run one command. Bad input exits 2 with one `error:` line; a closed output pipe (`| head`) exits
    quietly; Ctrl-C outside training (which checkpoints and says how to resume) exits 130."""
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, TrainingDiverged) as e:  # CheckpointError is a ValueError
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
