"""Functions that must run eagerly inside torch.compile'd blocks, marked without importing torch._dynamo.

`torch.compiler.disable` imports dynamo where it is applied, at import time: ~2.7 s in every process (a server, a
`generate`, each torchrun worker), though only `train.compile=true` and `nanoseek bench` compile. `eager` records
the function instead; `disable_marked`, called by whoever is about to compile, replaces each where it is looked up
(its module's global, or its class's attribute for a method) by its torch.compiler.disable'd version.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

Fn = TypeVar("Fn", bound=Callable)

_marked: list[Callable] = []


def eager(fn: Fn) -> Fn:
    _marked.append(fn)
    return fn


def disable_marked() -> None:
    """Every `eager` function, disabled for torch.compile where its callers look it up (idempotent)."""
    import torch

    for fn in _marked:
        *path, name = fn.__qualname__.split(".")
        owner = sys.modules[fn.__module__]
        for part in path:  # a method: the class that holds it
            owner = getattr(owner, part)
        if getattr(owner, name) is fn:
            setattr(owner, name, torch.compiler.disable(fn))
