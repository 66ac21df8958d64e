"""`retrain.train`'s keyword arguments -> the command line's settings, checked as it checks them.

Names are Config's fields (the flags without `--`); an unknown name is an
error listing the close matches. Values get the conversions a notebook needs
and YAML or argparse would have done (a pathlib.Path for a folder, a NumPy
number, one string for a one-item list); every range check is
`config.validate`'s, so the messages are the command line's.
"""

from __future__ import annotations

import difflib
import numbers
import os
from dataclasses import fields
from typing import Any

import numpy as np

from retrain.config import Config
from retrain.errors import RetrainError

# Config field -> its declared type without Optional[...]: "str", "int", "float", "bool", "list[str]".
_TYPES = {
    f.name: f.type[len("Optional[") : -1] if f.type.startswith("Optional[") else f.type
    for f in fields(Config)
}


def check_names(names, extra=()) -> None:
    """Raise RetrainError naming the first keyword that is no setting, with close matches.

    extra: keywords the caller takes besides the settings (they count as known).
    """
    known = [*_TYPES, *extra]
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise RetrainError(
            f"Unknown setting {name!r}.{hint} Settings are the command line's flags without "
            f"'--' (docs/settings.md). Received: {name}"
        )


def settings_of(keywords: dict[str, Any]) -> dict[str, Any]:
    """The settings `keywords` name, each value converted to its field's type.

    Raises RetrainError for an unknown name or a value of the wrong type
    (`config.validate` checks the ranges afterwards).
    """
    check_names(keywords)
    return {name: _converted(name, value) for name, value in keywords.items()}


def _converted(name: str, value: Any) -> Any:
    """`value` as the field `name` stores it; RetrainError if it cannot be that type."""
    kind = _TYPES[name]
    if value is None:
        return None  # validate says which fields need a value
    if kind == "str" and isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if isinstance(path, str):
            return path
    elif kind == "bool" and isinstance(value, (bool, np.bool_)):
        return bool(value)
    elif kind in ("int", "float") and isinstance(value, numbers.Real):
        # Leave bools and fractions of ints to validate, which names the field.
        if isinstance(value, bool) or kind == "int" and not isinstance(value, numbers.Integral):
            return value
        return int(value) if kind == "int" else float(value)
    elif kind == "list[str]":
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(item, str) for item in items):
            return list(items)
        return value  # validate names the field and what it takes
    expected = {"str": "a str or path", "bool": "True or False"}.get(kind, f"a {kind}")
    raise RetrainError(f"{name} must be {expected}. Received: {name}={value!r}")
