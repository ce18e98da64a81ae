"""Lazy imports of the optional ``demo`` dependencies, with an actionable error message."""

from __future__ import annotations

import importlib
from types import ModuleType

_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "rich": "rich"}
#: The extra that installs a package, when it is not ``demo``.
_EXTRAS = {"tensorboard": "tensorboard"}


class MissingDependencyError(ImportError):
    """An optional dependency of the ``actreg`` command is not installed."""


def require(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.datasets"``) or raise :class:`MissingDependencyError`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        package = _PACKAGES.get(top, top)
        extra = _EXTRAS.get(top, "demo")
        raise MissingDependencyError(
            f"the actreg command needs the optional dependency {package!r} (import {module!r} "
            f"failed: {err}). Install the {extra} extra: pip install 'actreg[{extra}]'"
        ) from err


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg", force=True)
    return require("matplotlib.pyplot")
