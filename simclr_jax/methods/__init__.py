"""Objectives as plug-ins: each module here registers one `Method` (see `base.py`).

Importing the package imports every module in it, so adding a method is one new file (plus a
config); the loop looks methods up by `config.method` and knows none by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from simclr_jax.methods.base import REGISTRY, Method, get, names, register

__all__ = ["REGISTRY", "Method", "get", "names", "register"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
