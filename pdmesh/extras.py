"""Optional dependencies (pyproject's extras): a clear error that names the extra to install.

A worker or coordinator image installs the bare package; the benchmarks' plots and the Hugging Face
reference need the ``bench`` extra. Importing through ``require`` turns a bare ``ModuleNotFoundError``
into one line a user can act on.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``module``, imported; ``MissingExtra`` naming ``pdmesh[extra]`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        package = module.split(".")[0]
        raise MissingExtra(
            f"{purpose} needs {package}, which the {extra!r} extra installs: pip install 'pdmesh[{extra}]'"
        ) from exc
