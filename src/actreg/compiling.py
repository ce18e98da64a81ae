"""torch.compile must see the forward hooks actreg adds, or a compiled model silently records nothing.

Dynamo does not guard on a module's forward hooks while the hook dictionaries are empty
(``torch._dynamo.config.skip_nnmodule_hook_guards``, True by default), and with nn modules inlined
its compiled graphs are shared by every module of the same structure. So a graph compiled while a
regularized module had no hooks yet -- the same model run compiled before the regularizer was
built, or *another* model of the same architecture compiled earlier (an evaluation copy, a
baseline) -- is reused for the hooked module without calling the hooks: the penalty is silently 0.

:func:`guard_hooks` turns those guards on (a changed set of hooks then recompiles, as it should),
once per process. Graphs compiled before that have no such guard; rather than dropping every
compiled graph of the process (``torch._dynamo.reset()`` also clears the user's compile callbacks
and cudagraph trees, and recompiles unrelated models), it adds one guard to each of them, on every
module their guards reach: "this module carries no actreg hook" (:func:`_refuse_hooked`). Such a
graph keeps serving every module it served before -- an unrelated model, a function without modules,
the unregularized evaluation copy -- and fails its guards for a regularized module, which is then
compiled anew, with its hooks and dynamo's own hook guards. Where dynamo's cache cannot be read
this way (another torch version), it falls back to ``torch._dynamo.reset()``.

It never imports ``torch._dynamo`` (seconds of import time for programs that do not compile): if
dynamo is not loaded yet, nothing has been compiled, and the guards are turned on at the first
``loss()`` after it is loaded.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

_guarded = False
#: every module actreg has hooked in this process (weakly): what a graph compiled before the hook
#: guards were on must not run
_hooked: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def hooks_guarded() -> bool:
    """Whether :func:`guard_hooks` has done its work in this process."""
    return _guarded


def guard_hooks(*, reset: bool, modules: Iterable[nn.Module] = ()) -> None:
    """Note the ``modules`` actreg hooks, and make dynamo guard on module hooks (once per process).

    Graphs compiled before that are kept but refused for every hooked module (see the module
    docstring); if dynamo's cache cannot be read to do so and ``reset`` is set, dynamo is reset
    instead. A no-op, apart from noting the modules, until ``torch._dynamo`` is loaded, and while
    dynamo traces.
    """
    global _guarded
    _hooked.update(modules)
    if _guarded:
        return
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None or torch.compiler.is_compiling():
        return
    _guarded = True
    if not dynamo.config.skip_nnmodule_hook_guards:
        return  # guarded already (set by the user): every graph compiled so far checks the hooks
    dynamo.config.skip_nnmodule_hook_guards = False
    if dynamo.utils.counters["frames"]["ok"] and not _refuse_hooked() and reset:
        dynamo.reset()


def _not_hooked(module: object) -> bool:
    """The guard added to graphs compiled before the hook guards: ``module`` has no actreg hook."""
    return module not in _hooked


def _refuse_hooked() -> bool:
    """Add :func:`_not_hooked` to every module node of every graph dynamo has cached so far.

    Returns False, having changed nothing, if this torch's cache cannot be read that way.
    """
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch._C._dynamo.guards import DictGuardManager
        from torch._dynamo import convert_frame

        weak_codes = [*convert_frame.input_codes.seen, *convert_frame.output_codes.seen]
        codes = {id(c): c for c in (w() for w in weak_codes) if c is not None}
        nodes: list[Any] = []
        for code in codes.values():
            for entry in _debug_get_cache_entry_list(code):
                nodes.extend(_module_nodes(entry.guard_manager.root, DictGuardManager))
        if nodes:
            add = _lambda_guard_adder(nodes[0])  # (it adds the guard to nodes[0])
            for node in nodes[1:]:
                add(node)
    except Exception:  # any other layout of dynamo's private cache: fall back
        return False  # (a graph that got the guard before this failure is refused, as it should be)
    return True


def _module_nodes(root: Any, dict_manager: Any) -> list[Any]:
    """The guard-tree nodes (``GuardManager``) under ``root`` whose guarded value is an ``nn.Module``."""
    out: list[Any] = []
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        guarded = node.get_type_of_guarded_value()
        if isinstance(guarded, type) and issubclass(guarded, nn.Module):
            out.append(node)
        stack.extend(node.get_child_managers())
        if isinstance(node, dict_manager):  # a dict's keys and values hang off it in pairs
            stack.extend(m for pair in node.get_key_value_managers().values() for m in pair if m is not None)
    return out


def _lambda_guard_adder(probe: Any) -> Callable[[Any], None]:
    """Adds :func:`_not_hooked` to ``probe`` and returns ``add(node)``, which adds it to another node,
    with the signature this torch's ``GuardManager.add_lambda_guard`` has (a third argument, the
    user stack, in recent versions). Raises if neither signature fits."""
    parts = ["actreg: the module has no actreg hook (graph compiled before actreg guarded hooks)"]
    try:
        probe.add_lambda_guard(_not_hooked, parts, None)
        rest: tuple[Any, ...] = (parts, None)
    except TypeError:
        probe.add_lambda_guard(_not_hooked, parts)
        rest = (parts,)
    return lambda node: node.add_lambda_guard(_not_hooked, *rest)
