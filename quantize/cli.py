"""``dbrxq quantize SRC OUT``: the click command over :func:`quantize.writer.quantize_checkpoint`.

Registered by dbrxq/cli.py with ``cli.add_command(quantize_command, "quantize")``. Option values
are checked here and refused with a one-line QuantizationError naming the option (exit status 2
through dbrxq.cli.main), not click's multi-line usage error. The summary is the command's output.
"""

from __future__ import annotations

import time

import click

from dbrxq.errors import QuantizationError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
METHODS = ("rtn",)  # gptq arrives with calibration; not offered before it works
EXPERT_BITS, ATTN_BITS, LM_HEAD_BITS = (4, 8), (4, 8, 16), (8, 16)
GROUP_SIZES = (32, 64, 128, -1)


def _choice(option: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise QuantizationError(f"{option} {value} is not supported; choose one of "
                                f"{', '.join(map(str, allowed))}")


@click.command(context_settings=CONTEXT)
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--method", default="rtn", show_default=True, metavar="[rtn]",
              help="Quantization method: rtn (round to nearest, no calibration data).")
@click.option("--expert-bits", default=4, show_default=True, type=int, metavar="[4|8]",
              help="Bits of the expert weights (96% of the model's bytes).")
@click.option("--group-size", default=128, show_default=True, type=int, metavar="[32|64|128|-1]",
              help="Expert group size along the input dim; -1 = one scale per output channel.")
@click.option("--attn-bits", default=8, show_default=True, type=int, metavar="[4|8|16]",
              help="Bits of attention Wqkv/out_proj; 16 keeps them bf16.")
@click.option("--attn-group-size", default=-1, show_default=True, type=int, metavar="[32|64|128|-1]",
              help="Attention group size; -1 = per-channel.")
@click.option("--lm-head-bits", default=16, show_default=True, type=int, metavar="[8|16]",
              help="8 quantizes lm_head per-channel; 16 keeps it bf16.")
@click.option("--asym", is_flag=True, help="Asymmetric quantization (stored uint8 zero points).")
@click.option("--revision", help="Hub revision when SRC is a repo id.")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in OUT.")
def quantize_command(src, out, method, expert_bits, group_size, attn_bits, attn_group_size, lm_head_bits,
                     asym, revision, overwrite) -> None:
    """Quantize the float DBRX checkpoint SRC (a folder or hub repo id) into the folder OUT.

    OUT loads with `dbrxq run OUT` and dbrxq.load(OUT); its format is in quantize/FORMAT.md.
    """
    _choice("--method", method, METHODS)
    _choice("--expert-bits", expert_bits, EXPERT_BITS)
    _choice("--group-size", group_size, GROUP_SIZES)
    _choice("--attn-bits", attn_bits, ATTN_BITS)
    _choice("--attn-group-size", attn_group_size, GROUP_SIZES)
    _choice("--lm-head-bits", lm_head_bits, LM_HEAD_BITS)
    from quantize.config import ModuleQuant, QuantConfig
    from quantize.writer import checkpoint_size, quantize_checkpoint

    sym = not asym
    qconfig = QuantConfig(
        method=method,
        experts=ModuleQuant(expert_bits, group_size, sym),
        attn=ModuleQuant(attn_bits, attn_group_size, sym),
        lm_head=ModuleQuant(lm_head_bits, -1, sym),
    )
    t0 = time.perf_counter()
    folder = quantize_checkpoint(src, out, qconfig, overwrite=overwrite, revision=revision)
    seconds = time.perf_counter() - t0
    n_in, bytes_in = checkpoint_size(_source_dir(src, revision))
    n_out, bytes_out = checkpoint_size(folder)
    describe = lambda mq: "bf16" if not mq.quantized else (  # noqa: E731
        f"int{mq.bits} " + ("per-channel" if mq.group_size == -1 else f"g{mq.group_size}")
        + ("" if mq.symmetric else " asym"))
    click.echo(f"quantized {src} -> {folder} ({method})")
    click.echo(f"  experts {describe(qconfig.experts)}, attention {describe(qconfig.attn)}, "
               f"lm_head {describe(qconfig.lm_head)}; embeddings, norms, router as stored")
    click.echo(f"  tensors  {n_in} in, {n_out} out")
    click.echo(f"  bytes    {_size(bytes_in)} in, {_size(bytes_out)} out "
               f"({bytes_in / max(bytes_out, 1):.2f}x smaller)")
    click.echo(f"  time     {seconds:.1f} s ({bytes_in / 1e6 / max(seconds, 1e-9):.0f} MB/s of source)")


def _source_dir(src: str, revision: str | None):
    from dbrxq.checkpoint import resolve_model_dir  # cached by now for a hub repo

    return resolve_model_dir(src, revision=revision)


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"
