"""Strict JSON for everything the package, its recipes and its benchmarks write.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` by default, which are not JSON:
``jq``, JavaScript's ``JSON.parse`` and most other readers reject the whole file. Here every
non-finite float becomes ``null`` and the encoder runs with ``allow_nan=False``, so a value that
slips past the conversion raises instead of writing an invalid file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["dump", "dumps", "to_strict", "write_json"]


def to_strict(obj: Any) -> Any:
    """A copy of ``obj`` with every NaN or infinite float replaced by ``None`` (JSON ``null``).

    Walks dicts, lists and tuples; numpy arrays and scalars and torch tensors (anything with a
    ``tolist()``) become nested lists of Python numbers first. Other values are returned as they
    are, for ``json``'s own handling (or its ``default=``).
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {k: to_strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict(v) for v in obj]
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return to_strict(tolist())
    return obj


def _strict_default(default: Any) -> Any:
    """Wraps a ``default=`` hook so that what it returns is made strict too."""
    if default is None:
        return None
    return lambda o: to_strict(default(o))


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``to_strict(obj)`` with ``allow_nan=False`` (other keywords pass on)."""
    kwargs["default"] = _strict_default(kwargs.get("default"))
    return json.dumps(to_strict(obj), allow_nan=False, **kwargs)


def dump(obj: Any, fp: IO[str], **kwargs: Any) -> None:
    """``json.dump`` of ``to_strict(obj)`` with ``allow_nan=False`` (other keywords pass on)."""
    kwargs["default"] = _strict_default(kwargs.get("default"))
    json.dump(to_strict(obj), fp, allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Writes ``obj`` to ``path`` as strict JSON with a trailing newline."""
    Path(path).write_text(dumps(obj, indent=indent) + "\n")
