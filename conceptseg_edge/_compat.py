"""Optional dependencies behind one door: ``require`` names the extra that brings a missing module."""

from __future__ import annotations

import importlib
from types import ModuleType

from conceptseg_edge.errors import DependencyError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise a ``DependencyError`` that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(
            f"{module} is not installed: pip install 'conceptseg-edge[{extra}]'"
        ) from exc


def is_available(module: str) -> bool:
    """True when ``module`` imports; used by tests and fallbacks, never to auto-install."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
