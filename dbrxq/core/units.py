"""Sizes and rates for people and from people: "20GiB" -> bytes, bytes -> "7.14 MiB".
"""

from __future__ import annotations

import re

from dbrxq.core.errors import BudgetError

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, option: str = "size") -> int:
    """'20GiB', '512MiB', '1.5GB', '4096B' or an int -> bytes. Units are required for strings
    (a bare number is ambiguous); binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) units,
    case-insensitive.

    Raises:
        BudgetError: one line naming ``option`` and an example.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise BudgetError(f"{option}: {text} is negative")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise BudgetError(f"{option}: cannot read {text!r} as a size; write e.g. 20GiB, 512MiB or 1.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: int | float) -> str:
    """Bytes for people, in binary units: "512 B", "7.14 MiB", "65.31 GiB" (the one formatter of
    sizes in dbrxq's output: plans, quantize summaries, offload stats)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_rate(nbytes: int | float, seconds: float) -> str:
    """A throughput in the same units: "16.40 GiB/s"."""
    return f"{format_size(nbytes / max(seconds, 1e-9))}/s"
