"""Attributes of a package loaded on first use (PEP 562), so ``import so3lib`` stays cheap: models, MD and
checkpointing import jax, flax, e3nn-jax or orbax only when they are first touched."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``; ``where`` maps an attribute to the module defining it
    (a module path ending in ``:`` means the attribute is that module itself)."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        module = where[name]
        if module.endswith(":"):
            return importlib.import_module(module[:-1])
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__
