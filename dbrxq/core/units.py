"""Sizes and rates for people and from people: "20GiB" -> bytes, bytes -> "7.14 MiB".
"""

from __future__ import annotations

import re

from dbrxq.core.errors import BudgetError

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


MAX_SIZE = 1 << 60  # 1 EiB: beyond any machine's memory or disk, and far inside an int64


def parse_size(text: str | int, option: str = "size") -> int:
    """'20GiB', '512MiB', '1.5GB', '4096B', a bare whole number of bytes ('39937488') or an int ->
    bytes; binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) units, case-insensitive; at
    most 1 EiB.

    Raises:
        BudgetError: one line naming ``option`` and an example.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if not 0 <= text <= MAX_SIZE:
            raise BudgetError(f"{option}: {text} is not a size from 0 to 1 EiB")
        return text
    m = re.fullmatch(r"\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or (unit not in _UNITS and not (unit == "" and "." not in m.group(1))):
        raise BudgetError(f"{option}: cannot read {str(text)!r:.60} as a size; write e.g. 20GiB, 512MiB, 1.5GB "
                          f"or a whole number of bytes")
    n = float(m.group(1)) * _UNITS.get(unit, 1)
    if n > MAX_SIZE:
        raise BudgetError(f"{option}: {str(text)!r:.60} is more than 1 EiB")
    return int(n) if unit else int(m.group(1))


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
