"""Options and output shared by the subcommands: the click context, --threads, memory sizes, the
runtime and offloading options of run and serve, and the --stats report.
"""

from __future__ import annotations

import resource

import click
import torch

from dbrxq.core.errors import BudgetError
from dbrxq.core.sysinfo import THREADS_HELP, max_threads, peak_rss_bytes
from dbrxq.core.units import format_size, parse_size

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def examples(*lines: str) -> str:
    """A command's --help epilog: "Examples:" and the command lines as written (click keeps a
    paragraph that starts with \\b unwrapped)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def peak_memory(device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    text = f"peak RSS {rss:.0f} MiB"
    if device.type == "cuda":
        text += f", peak GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return text


def threads_option(f):
    """--threads, shared by run, serve, eval, compare and quantize."""
    return click.option("--threads", type=click.IntRange(1, max_threads()), help=THREADS_HELP)(f)


class SizeType(click.ParamType):
    """A memory size like 20GiB, 512MiB, 1.5GB (dbrxq.core.units.parse_size), as bytes; with ``auto``,
    also the word auto (dbrxq.core.memory.auto_budget decides, at load)."""

    name = "SIZE"

    def __init__(self, auto: bool = False):
        self.auto = auto

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        if self.auto and isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return parse_size(value, param.opts[0] if param else "size")
        except BudgetError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)


class Seconds(click.ParamType):
    """A finite number of seconds from 0 to ``hi`` (click's FloatRange lets nan through)."""

    name = "SECONDS"

    def __init__(self, hi: float):
        self.hi = hi

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r:.40} is not a number of seconds", param, ctx)
        if not 0 <= v <= self.hi:  # also false for nan
            self.fail(f"{value!r:.40} is not a number of seconds from 0 to {self.hi:g}", param, ctx)
        return v


def runtime_options(f):
    """The options that say how a model runs (device, dtype, memory budgets, KV cache, context,
    offloading, threads), shared by run and serve."""
    for opt in reversed([
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (the checkpoint's), float32, bfloat16 or float16."),
        click.option("--revision", help="Hub revision when MODEL is a repo id."),
        click.option("--gpu-memory", type=SizeType(), help="GPU budget (e.g. 20GiB): offload experts that do not fit."),
        click.option("--cpu-memory", type=SizeType(auto=True),
                     help="RAM budget of the whole process (e.g. 8GiB), or auto: the memory cgroup's limit or "
                          "what is available, less a margin; on CPU the experts that do not fit are read from "
                          "disk; with CUDA, the pinned host tier [default: auto when the model does not fit, "
                          "else none]."),
        click.option("--kv-cache", type=click.Choice(["bf16", "int8"]), default="bf16", show_default=True,
                     help="KV cache flavour: the model's dtype, or int8 with per-token scales (about half)."),
        click.option("--context", type=click.IntRange(min=1),
                     help="Tokens (prompt + new) the memory plan reserves KV cache for (serve: per request) "
                          "[default: min(max_seq_len, 4096)]."),
        click.option("--expert-policy", type=click.Choice(["lru", "lfu", "static"]), default=None,
                     help="With offloading, which experts stay in the slots: lfu (default; decayed, admits a miss only "
                          "if it is hotter than what it would evict, seeded with the quantize report's routing "
                          "counts), lru, static (the most-routed experts, pinned)."),
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Where offloading keeps its prepared-expert files [default: $DBRXQ_CACHE, else "
                          "~/.cache/dbrxq]."),
        click.option("--expert-prefetch/--no-expert-prefetch", default=None,
                     help="With offloading, guess the next layer's experts and start reading them early "
                          "[default: on with CUDA, off on CPU, where a wrong guess costs the scarce reads]."),
        click.option("--direct-io/--page-cache-io", default=None,
                     help="With offloading on CPU, read experts with O_DIRECT (bypassing the page cache) or through "
                          "the page cache [default: O_DIRECT under --cpu-memory auto, where every read is dropped from "
                          "the page cache; otherwise the way each source's reads measure cheaper]."),
        threads_option,
    ]):
        f = opt(f)
    return f


def offload_options(cache_dir, policy, prefetch, direct, timing=False) -> dict:
    """The --cache-dir / --expert-policy / --expert-prefetch / --direct-io / --stats choices that were made."""
    opts = {"cache_dir": cache_dir, "policy": policy, "prefetch": prefetch, "direct": direct,
            "timing": timing or None}
    return {k: v for k, v in opts.items() if v is not None}


def offload_report(rt) -> str:
    """--stats lines for an offloaded run: per decode token latency split, cache, bytes, memory."""
    lines = []
    for name, ph in rt.stats.phases.items():
        if not ph.tokens:
            continue
        n = ph.tokens
        lines.append(f"[{name}: per token attention {1e3 * ph.attention_s / n:.1f} ms, experts resident "
                     f"{1e3 * ph.resident_s / n:.1f} ms, experts missed {1e3 * ph.missed_s / n:.1f} ms; hit rate "
                     f"{ph.hit_rate:.1%} ({ph.hits} hits, {ph.misses} misses"
                     f"{f', {ph.from_page_cache} computed from the page cache' if ph.from_page_cache else ''}); moved "
                     f"{format_size(ph.bytes_moved / n)}/token]")
    peak = ", ".join(f"{k} {format_size(v)}" for k, v in rt.stats.peak.items())
    choice = getattr(rt.file, "choice", None)
    if choice is not None:
        lines.append(f"[{choice.summary()}]")
    lines.append(f"[tracked peak per tier: {peak}; peak RSS {format_size(peak_rss_bytes())}; "
                 f"prefetched {rt.cache.counters.prefetched}, evictions {rt.cache.counters.evictions}]")
    return "\n".join(lines)
