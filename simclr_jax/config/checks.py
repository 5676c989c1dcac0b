"""The config error type and its check: below every module that validates config keys."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config key with a value that is not allowed; the message names both."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raises `ConfigError` naming `config.<key>`, its value and what is allowed, unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is invalid: {allowed}")
