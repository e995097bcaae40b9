"""``dbrxq eval`` and ``dbrxq compare``: perplexity of a model, and KL / top-1 agreement of two
models, on a text file (see dbrxq.runtime.evaluate for the sliding-window recipe).

MODEL may be a float or a quantized checkpoint: both load through dbrxq.load. A missing, empty
or too-short data file is a one-line DataError naming the file.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from dbrxq.api import load
from dbrxq.cli.options import CONTEXT, examples, threads_option
from dbrxq.core.untrusted import read_bytes
from dbrxq.runtime.evaluate import DataError, compare, perplexity



MAX_DATA_BYTES = 1 << 30  # --data is text to score: a gigabyte is hours of evaluation even for the demo


def read_text(path: Path) -> str:
    """The UTF-8 text of the --data file: a regular file (not a device such as /dev/zero, a pipe or
    a folder) of at most MAX_DATA_BYTES, read with that bound; DataError when it is missing,
    unreadable, too large, not UTF-8 or blank."""
    data = read_bytes(path, MAX_DATA_BYTES, what=f"--data {path}", error=DataError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: data file is empty")
    return text


def tokenize(path: Path, text: str, tokenizer, max_tokens: int | None) -> torch.Tensor:
    """Token ids (N,) of `text` cut to `max_tokens`; DataError naming `path` below 2 tokens."""
    ids = tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"{path}: data too short: {len(ids)} token(s); need at least 2")
    return torch.tensor(ids, dtype=torch.long)


DEFAULT_WINDOW = 512


def _window_and_stride(window: int | None, stride: int | None, *models) -> tuple[int, int]:
    """The window (default: 512, or the smallest model context below that) and stride (default:
    half the window); an explicit window beyond a model's context is a DataError."""
    ctx = min(m.config.max_seq_len for m in models)
    if window is None:
        window = min(DEFAULT_WINDOW, ctx)
    for m in models:
        if window > m.config.max_seq_len:
            raise DataError(f"--window {window} exceeds the model's context of {m.config.max_seq_len} tokens")
    if stride is None:
        stride = max(1, window // 2)
    if stride > window:
        raise DataError(f"--stride {stride} must not exceed --window {window}")
    return window, stride


def _options(f):
    """The options eval and compare share (defaults written once, here)."""
    for opt in reversed([
        click.option("--data", required=True, type=click.Path(path_type=Path), help="UTF-8 text file."),
        click.option("--window", type=click.IntRange(min=2),
                     help=f"Tokens per forward pass [default: {DEFAULT_WINDOW}, or the model's context if smaller]."),
        click.option("--stride", type=click.IntRange(min=1),
                     help="Step between windows; each token is scored once, with >= window-stride context "
                          "[default: half the window]."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (the checkpoint's), float32, bfloat16 or float16."),
        click.option("--max-tokens", type=click.IntRange(min=2), help="Score only the first N tokens."),
        threads_option,
    ]):
        f = opt(f)
    return f


@click.command(context_settings=CONTEXT, epilog=examples(
    'dbrxq eval MODEL --data wiki.test.raw --max-tokens 20000',
    'dbrxq eval demo --data calibration/data/heldout.txt --window 512 --stride 256',
))
@click.argument("model")
@_options
def eval_command(model, data, window, stride, device, dtype, max_tokens, threads) -> None:
    """Perplexity of MODEL (a folder, a hub repo id, or "demo": the shipped model; float or quantized)
    on the text in --data."""

    text = read_text(data)  # before loading: a typo in --data should not cost a model load
    runner = load(model, device=device, dtype=dtype, threads=threads)
    window, stride = _window_and_stride(window, stride, runner.model)
    ids = tokenize(data, text, runner.tokenizer, max_tokens)
    t0 = time.perf_counter()
    r = perplexity(runner.model, ids, window=window, stride=stride, progress=True)
    seconds = time.perf_counter() - t0
    click.echo(f"| model | tokens | nll | ppl |\n|---|---:|---:|---:|\n"
               f"| {model} | {r['tokens']} | {r['nll']:.4f} | {r['ppl']:.3f} |")
    click.echo(f"window {window}, stride {stride}, {seconds:.1f}s", err=True)


@click.command(context_settings=CONTEXT, epilog=examples(
    'dbrxq compare MODEL_FLOAT MODEL_Q4 --data wiki.test.raw --max-tokens 20000',
))
@click.argument("model_a")
@click.argument("model_b")
@_options
def compare_command(model_a, model_b, data, window, stride, device, dtype, max_tokens, threads) -> None:
    """Compare MODEL_B (e.g. quantized) with the reference MODEL_A (folders, hub repo ids, or "demo":
    the shipped model) on --data: perplexities, mean
    KL(A||B) per token (nats) and top-1 agreement, on exactly the same windows."""

    text = read_text(data)
    a = load(model_a, device=device, dtype=dtype, threads=threads)
    b = load(model_b, device=device, dtype=dtype)
    window, stride = _window_and_stride(window, stride, a.model, b.model)
    if a.model.config.vocab_size != b.model.config.vocab_size:
        raise DataError(f"{model_b}: vocab_size {b.model.config.vocab_size} differs from {model_a}'s "
                        f"{a.model.config.vocab_size}")
    ids = tokenize(data, text, a.tokenizer, max_tokens)
    t0 = time.perf_counter()
    r = compare(a.model, b.model, ids, window=window, stride=stride, progress=True)
    seconds = time.perf_counter() - t0
    click.echo(f"| | A | B |\n|---|---:|---:|\n| model | {model_a} | {model_b} |\n"
               f"| ppl | {r['ppl_a']:.3f} | {r['ppl_b']:.3f} |\n"
               f"| nll | {r['nll_a']:.4f} | {r['nll_b']:.4f} |\n\n"
               f"mean KL(A||B): {r['mean_kl']:.3e} nats/token\n"
               f"top-1 agreement: {r['top1_agreement']:.4f}\n"
               f"tokens: {r['tokens']}")
    click.echo(f"window {window}, stride {stride}, {seconds:.1f}s", err=True)
