"""torch.compile must see the forward hooks actreg adds, or a compiled model silently records nothing.

Dynamo does not guard on a module's forward hooks while the hook dictionaries are empty
(``torch._dynamo.config.skip_nnmodule_hook_guards``, True by default), and with nn modules inlined
its compiled graphs are shared by every module of the same structure. So a graph compiled while a
regularized module had no hooks yet -- the same model run compiled before the regularizer was
built, or *another* model of the same architecture compiled earlier (an evaluation copy, a
baseline) -- is reused for the hooked module without calling the hooks: the penalty is silently 0.

:func:`guard_hooks` turns those guards on (a changed set of hooks then recompiles, as it should)
and, if graphs were compiled before, resets dynamo's caches once so that none compiled without the
guards is reused. It never imports ``torch._dynamo`` (seconds of import time for programs that do
not compile): if dynamo is not loaded yet, nothing has been compiled, and the guards are turned on
at the first ``loss()`` after it is loaded.
"""

from __future__ import annotations

import sys

import torch

_guarded = False


def hooks_guarded() -> bool:
    """Whether :func:`guard_hooks` has done its work in this process."""
    return _guarded


def guard_hooks(*, reset: bool) -> None:
    """Make dynamo guard on module hooks (once per process); with ``reset``, drop graphs compiled
    without those guards. A no-op until ``torch._dynamo`` is loaded, and while dynamo traces."""
    global _guarded
    if _guarded:
        return
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None or torch.compiler.is_compiling():
        return
    _guarded = True
    if not dynamo.config.skip_nnmodule_hook_guards:
        return  # guarded already (set by the user): every graph compiled so far checks the hooks
    dynamo.config.skip_nnmodule_hook_guards = False
    if reset and dynamo.utils.counters["frames"]["ok"]:
        dynamo.reset()
