"""Exceptions the command line catches, in a module without heavy imports: `parscale fit` and the other
commands that need no model start without loading torch."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or inf."""
