"""Routing statistics for placement: the quantize report's per-expert token counts, and the routing
each offloaded run observes, saved beside the prepared-expert file and read back (checked like a
checkpoint file) to seed the next run's placement and eviction priors.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dbrxq.core.errors import DbrxqError
from dbrxq.core.files import write_json_atomic
from dbrxq.core.untrusted import MAX_INDEX_BYTES, is_int, read_json
from quantize.format import REPORT_NAME

log = logging.getLogger(__name__)

# A routing count is tokens seen: far below 2**53 (where floats, which the priors are, stop counting).
MAX_COUNT = 1 << 53


def is_count(v) -> bool:
    return is_int(v) and 0 <= v <= MAX_COUNT


def routing_prior(counts: list[int], num_experts: int) -> dict[int, float]:
    """Routing counts scaled so an average expert starts with the weight of ~20 uses."""
    scale = 20.0 / max(1.0, sum(counts) / num_experts)
    return {e: counts[e] * scale for e in range(num_experts)}


def routing_counts(folder: Path | None, n_layers: int, num_experts: int) -> list[list[int]] | None:
    """Per layer, per expert, the calibration tokens routed to it, from the checkpoint's
    ``quantize_report.json`` (written by `dbrxq quantize`); None when there is none or it does not fit."""
    path = Path(folder) / REPORT_NAME if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        layers = read_json(path, MAX_INDEX_BYTES, folder=Path(folder)).get("layers")
        counts = [[0] * num_experts for _ in range(n_layers)]
        for L in layers:
            for ex in L["experts"]:
                if not (is_int(L["layer"]) and 0 <= L["layer"] < n_layers and is_int(ex["expert"])
                        and 0 <= ex["expert"] < num_experts and is_count(ex["tokens"])):
                    raise TypeError
                counts[L["layer"]][ex["expert"]] = ex["tokens"]
    except (DbrxqError, AttributeError, KeyError, TypeError, IndexError):
        log.warning("%s: no usable per-expert routing counts; experts are placed as they come", path)
        return None
    return counts


ROUTING_FORMAT = "dbrxq-observed-routing-v1"


ROUTING_SAVE_EVERY = 64  # forward passes between saves of the observed routing counts


def routing_path(prepared: Path) -> Path:
    """Where the routing counts observed while running from ``prepared`` (a prepared-expert file) are kept."""
    return Path(prepared).with_suffix(".routing.json")


def save_routing(path: Path, observed: list[list[int]]) -> bool:
    try:
        write_json_atomic({"format": ROUTING_FORMAT, "counts": observed}, path)
    except OSError as e:
        log.warning("%s: could not save the observed routing counts (%s)", path, e)
        return False
    return True


def read_observed_routing(path: Path, n_layers: int, num_experts: int) -> list[list[int]] | None:
    """Counts written by :meth:`OffloadRuntime.save_routing`, checked (shape, non-negative integers);
    None when absent or unusable (with a warning: the cache then starts as it would without them)."""
    if not path.is_file():
        return None
    try:
        data = read_json(path, MAX_INDEX_BYTES, folder=path.parent)
        counts = data["counts"]
        ok = (data.get("format") == ROUTING_FORMAT and isinstance(counts, list) and len(counts) == n_layers
              and all(isinstance(r, list) and len(r) == num_experts and all(is_count(c) for c in r)
                      for r in counts))
    except (DbrxqError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        log.warning("%s: not usable routing counts; ignored (they are rewritten as this run observes routing)", path)
        return None
    return counts
