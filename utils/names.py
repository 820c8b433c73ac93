"""Class names in the one form the project uses everywhere: {0: 'person', 1: 'bicycle', ...}."""
from __future__ import annotations

from typing import Iterable, Mapping


def normalize_names(names: Mapping | Iterable | None) -> dict[int, str]:
    """{index: name} sorted by index, from a list/tuple of names or a mapping keyed by integers (or integer
    strings, as json and yaml give them); {} for None. Raises ValueError naming the first key that is not an
    integer, TypeError for a single string (a common slip: names: person)."""
    if names is None:
        return {}
    if isinstance(names, Mapping):
        out = {}
        for k, v in names.items():
            try:
                out[int(k)] = str(v)
            except (TypeError, ValueError):
                raise ValueError(f"class names must be keyed by integers, got key {str(k)[:40]!r}") from None
        return dict(sorted(out.items()))
    if isinstance(names, (str, bytes)):
        raise TypeError(f"class names must be a list or a mapping {{index: name}}, got the string {names[:40]!r}")
    return {i: str(n) for i, n in enumerate(names)}
