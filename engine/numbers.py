"""Whole numbers from outside (HTTP, forms, CLI, JSON): taken only when they are whole and in range, so
"1.5" never acts on job 1, "abc" is never compared with a number and 10**20 never reaches SQLite."""
from __future__ import annotations

from typing import Any

SQLITE_INT_MAX = 2**63 - 1  # SQLite's INTEGER; larger ids overflow inside the driver


def whole_number(value: Any, low: int, high: int) -> int:
    """`value` as an int in [low, high]; ValueError("must be ...") otherwise. Accepts ints, whole
    floats (number widgets send 4.0) and decimal strings (the CLI, query strings)."""
    number = value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int):
        raise ValueError(f"must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise ValueError(f"must be in [{low}, {high}], got {number}")
    return number


def named_whole_number(name: str, value: Any, low: int, high: int = SQLITE_INT_MAX) -> int:
    """whole_number() whose error names the field: "num_gpus: must be in [1, 64], got 0"."""
    try:
        return whole_number(value, low, high)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
