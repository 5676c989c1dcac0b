"""Config keys that moved or were removed: the one source for every refusal and migration.

Imports nothing heavy, so `main` can name the new key (or why the key is gone) for an old
`--config.<key>` before JAX starts; the schema refuses a config file that still sets an old key,
and the resume check renames moved keys and drops removed ones in a saved `config.json`, so runs
saved before the change resume.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# SimCLR's keys went from the top level into its own section, like every other method's.
MOVED_KEYS: dict[str, str] = {
    "temperature": "simclr.temperature",
    "loss.impl": "simclr.loss_impl",
    "loss.chunk_size": "simclr.loss_chunk_size",
    "loss.decoupled": "simclr.decoupled",
}
# Keys read by nothing any more, old dotted name -> why (the rest of the one-line refusal).
REMOVED_KEYS: dict[str, str] = {
    "data.shuffle_buffer": (
        "streamed datasets are read in a seeded permutation of the whole split every epoch "
        "(docs/data.md), so there is no shuffle buffer to size; drop the setting"
    ),
}


def moved_message(old: str) -> str:
    """The one line that names an old key's new place, or why a removed key is gone."""
    if old in REMOVED_KEYS:
        return f"config.{old} was removed: {REMOVED_KEYS[old]}"
    return f"config.{old} moved to config.{MOVED_KEYS[old]}"


def first_moved(keys: Iterable[str]) -> str | None:
    """The first of the dotted `keys` that is an old (moved or removed) key, or None."""
    return next((k for k in keys if k in MOVED_KEYS or k in REMOVED_KEYS), None)


def moved_in_args(argv: Iterable[str], flag: str = "config") -> str | None:
    """The first old key that a `--<flag>.<key>[=value]` command-line argument overrides."""
    prefix = f"--{flag}."
    names = (a[len(prefix) :].split("=", 1)[0] for a in argv if a.startswith(prefix))
    return first_moved(names)


def moved_in_source(line: str) -> str | None:
    """The old key that a config-file line such as `c.loss.impl = ...` sets or reads, or None.

    Only `<name>.<old key>` directly on a variable counts (`c.moco.temperature` is not SimCLR's).
    """
    for old in (*MOVED_KEYS, *REMOVED_KEYS):
        if re.search(rf"(?<![\w.])\w+\.{re.escape(old)}\b", line):
            return old
    return None


def migrate(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened saved config with its moved keys renamed (new ones win), removed ones dropped."""
    out = {k: v for k, v in flat.items() if k not in MOVED_KEYS and k not in REMOVED_KEYS}
    for old, new in MOVED_KEYS.items():
        if old in flat and new not in flat:
            out[new] = flat[old]
    return out
