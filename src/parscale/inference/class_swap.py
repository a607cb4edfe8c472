"""Swapping a module's class in place — how parscale's kernels are switched on from outside the model — so that
code torch.compile traced before the swap is traced again.

torch 2.11's dynamo skips the guards of a module whose `__dict__` has not changed since it was traced, and a
class assignment (`module.__class__ = cls`) leaves `__dict__` as it was: a decode step compiled before the swap
went on running the old class's code (on an H100 a compiled engine gave the plain path's logits after
`use_decode_attention`; on the CPU, with an attention class of a test, it ran the old class's code; torch 2.13
checks the type either way). Writing the class into the module's `__dict__` as well makes those guards run
again, and their type check then sees the new class.
"""

from __future__ import annotations

from torch import nn

_ATTRIBUTE = "_parscale_class"


def swap_class(module: nn.Module, cls: type) -> None:
    """module.__class__ = cls, noticed by code compiled before it (module docstring)."""
    module.__class__ = cls
    note_class(module)


def note_class(module: nn.Module) -> bool:
    """Record the module's class in its __dict__ if it is not recorded yet (a class swapped by other code than
    swap_class); True if anything was written."""
    if module.__dict__.get(_ATTRIBUTE) is type(module):
        return False
    module.__dict__[_ATTRIBUTE] = type(module)
    return True


def note_classes(model: nn.Module) -> int:
    """note_class for every submodule; how many were written (a compiled step traces those again)."""
    return sum(note_class(m) for m in model.modules())
