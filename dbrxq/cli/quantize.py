"""``dbrxq quantize SRC OUT``: the click command over the two quantizers.

An OUT ending in ``.gguf`` is a GGUF file instead (``--recipe`` or ``--target-size``): llama.cpp's K-quant mixes
(or types allocated to fit the size) solved by GPTQ onto their grids (dbrxq.export.gguf), the one file that
llama.cpp and dbrxq's runtime both run. Otherwise ``--method gptq`` (the default) goes through :func:`calibration.pipeline.quantize_with_calibration`
(layer streaming, calibration data, manifest and ``--resume``); ``--method rtn`` through
:func:`quantize.writer.quantize_checkpoint` (no calibration data, one streaming pass), unless
``--target-bits``/``--target-size`` asks for per-expert recipes, which are chosen on calibration data
(calibration.allocation), so those runs take the pipeline with either method. Both write the
canonical layout of :func:`quantize.specs.quantized_tensor_specs`.

Registered by dbrxq/cli/app.py with ``cli.add_command(quantize_command, "quantize")``. Option values
are checked here and refused with a one-line QuantizationError naming the option (exit status 2
through dbrxq.cli.app.main), not click's multi-line usage error. The summary is the command's output.
"""

from __future__ import annotations

import sys
import time

import click
from click.core import ParameterSource

from calibration.options import CalibrationOptions
from calibration.pipeline import quantize_with_calibration
from dbrxq.cli.options import CONTEXT, examples, threads_option
from dbrxq.core.errors import QuantizationError
from dbrxq.core.sysinfo import parse_device, set_threads
from dbrxq.core.units import format_rate, format_size, parse_size
from dbrxq.export.gguf import export_gguf
from dbrxq.formats.hub import resolve_model_dir, resolve_model_name
from quantize.config import ModuleQuant, QuantConfig
from quantize.format import REPORT_NAME
from quantize.writer import checkpoint_size, quantize_checkpoint

METHODS = ("rtn", "gptq")
RARE_STRATEGIES = ("route-all", "rtn")
EXPERT_BITS, ATTN_BITS, LM_HEAD_BITS = (2, 3, 4, 8), (4, 8, 16), (8, 16)
GROUP_SIZES = (32, 64, 128, -1)
GGUF_RECIPES = ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q8_0")  # llama.cpp's mixes (quantize/recipes.py)
# dbrxq-format options a GGUF recipe sets for itself (every tensor's type): refused when given with one
NOT_FOR_GGUF = ("expert_bits", "target_bits", "group_size", "attn_bits", "attn_group_size", "lm_head_bits", "asym",
                "attn_asym", "layout", "resume")


def _choice(option: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise QuantizationError(f"{option} {value} is not supported; choose one of "
                                f"{', '.join(map(str, allowed))}")


@click.command(context_settings=CONTEXT, epilog=examples(
    'dbrxq quantize SRC OUT                               # GPTQ int4 experts, int8 attention',
    'dbrxq quantize SRC OUT --method rtn                  # no calibration: seconds per layer',
    'dbrxq quantize databricks/dbrx-instruct OUT --target-size 48GB',
    'dbrxq quantize SRC OUT --resume                      # continue an interrupted run',
    'dbrxq quantize SRC model.gguf --recipe q4_k_m        # llama.cpp\'s Q4_K_M mix, GPTQ-solved: llama.cpp and dbrxq run it',
    'dbrxq quantize SRC model.gguf --target-size 40GB     # a GGUF file, each matrix\'s type chosen to fit',
))
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--recipe", type=click.Choice(GGUF_RECIPES, case_sensitive=False),
              help="Write OUT (a .gguf file) in llama.cpp's mix: each tensor's type as llama-quantize chooses, "
                   "solved by GPTQ onto its grid on the calibration data (--method rtn: rounded to nearest; q8_0 is "
                   "always rounded). The file runs in llama.cpp, Ollama and dbrxq (dbrxq run OUT.gguf).")
@click.option("--method", default="gptq", show_default=True, metavar="[rtn|gptq]",
              help="gptq: calibrated, layer by layer (resumable); rtn: round to nearest, no data.")
@click.option("--expert-bits", default=4, show_default=True, type=int, metavar="[2|3|4|8]",
              help="Bits of the expert weights (96% of the model's bytes).")
@click.option("--target-bits", type=float, metavar="B",
              help="Choose each expert's recipe (2, 3, 4 or 8 bits) to minimise the predicted error at an "
                   "average of B bits (e.g. 3.0, 2.5); measured on the calibration data.")
@click.option("--target-size", metavar="SIZE",
              help="The same for a whole-checkpoint size, e.g. 48GB (the other tensors are counted first); for an "
                   "OUT.gguf file, each matrix's GGML type (Q2_K .. Q6_K, Q8_0, F16) chosen to fit.")
@click.option("--group-size", default=128, show_default=True, type=int, metavar="[32|64|128|-1]",
              help="Expert group size along the input dim; -1 = one scale per output channel.")
@click.option("--attn-bits", default=8, show_default=True, type=int, metavar="[4|8|16]",
              help="Bits of attention Wqkv/out_proj; 16 keeps them bf16.")
@click.option("--attn-group-size", default=-1, show_default=True, type=int, metavar="[32|64|128|-1]",
              help="Attention group size; -1 = per-channel.")
@click.option("--lm-head-bits", default=16, show_default=True, type=int, metavar="[8|16]",
              help="8 quantizes lm_head per-channel; 16 keeps it bf16.")
@click.option("--asym/--sym", default=False,
              help="Experts asymmetric (a zero point per group) or symmetric [default: symmetric, over all "
                   "2**bits levels: as accurate or more at every width, with no zero points to store].")
@click.option("--attn-asym", is_flag=True, help="Attention (and an int8 lm_head) asymmetric too.")
@click.option("--layout", default="auto", show_default=True, type=click.Choice(["auto", "blocks", "canonical"]),
              help="How the codes are stored: blocks, the CPU kernel's own layout (loads as a memory map; "
                   "offloading reads experts straight from it); canonical, per-weight codes and scales "
                   "(repacked at every load); auto: blocks wherever the kernel's blocks hold the model's shapes.")
@click.option("--calib-data", metavar="PATH", help="Calibration text: .txt, .jsonl, or "
              "hf://datasets/ORG/NAME/FILE [default: the packaged calibration/data/calib.txt].")
@click.option("--calib-field", default="text", show_default=True, help="Text field of a .jsonl file.")
@click.option("--calib-samples", default=64, show_default=True, type=int,
              help="Calibration sequences N (64 x 512 tokens fit the packaged text).")
@click.option("--calib-seq-len", default=512, show_default=True, type=int, help="Tokens per sequence L.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration windows.")
@click.option("--rare-experts", default="route-all", show_default=True, metavar="[route-all|rtn]",
              help="Experts routed too few calibration tokens: Hessian from all tokens, or RTN.")
@click.option("--min-expert-tokens", type=int, help="Rare-expert threshold [default: d_model / 8].")
@click.option("--device", default="cpu", show_default=True, help="Calibration device (cpu, cuda, cuda:N).")
@click.option("--resume", is_flag=True, help="Continue an interrupted gptq run in OUT (same options).")
@click.option("--revision", help="Hub revision when SRC is a repo id.")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in OUT.")
@threads_option
def quantize_command(src, out, recipe, method, expert_bits, target_bits, target_size, group_size, attn_bits, attn_group_size,
                     lm_head_bits, asym, attn_asym, layout, calib_data, calib_field, calib_samples, calib_seq_len, seed,
                     rare_experts, min_expert_tokens, device, resume, revision, overwrite, threads) -> None:
    """Quantize the float DBRX checkpoint SRC (a folder, a hub repo id, or "demo": the small model
    shipped with dbrxq, unless a local folder named demo exists) into the folder OUT, or into the
    GGUF file OUT.gguf (--recipe, or --target-size).

    OUT loads with `dbrxq run OUT` and dbrxq.load(OUT); its format is in docs/format.md (GGUF: docs/gguf.md).
    """
    set_threads(threads)
    src = str(resolve_model_name(src))
    _choice("--method", method, METHODS)
    if recipe is not None or out.lower().endswith(".gguf"):
        _quantize_gguf(src, out, recipe, method, target_size, calib_data, calib_field, calib_samples, calib_seq_len,
                       seed, rare_experts, min_expert_tokens, device, revision, overwrite)
        return
    _choice("--expert-bits", expert_bits, EXPERT_BITS)
    _choice("--group-size", group_size, GROUP_SIZES)
    _choice("--attn-bits", attn_bits, ATTN_BITS)
    _choice("--attn-group-size", attn_group_size, GROUP_SIZES)
    _choice("--lm-head-bits", lm_head_bits, LM_HEAD_BITS)
    _choice("--rare-experts", rare_experts, RARE_STRATEGIES)
    if not 0 <= seed <= 2**64 - 1:
        raise QuantizationError(f"--seed must be an integer from 0 to 2**64 - 1, got {seed}")
    parse_device(device)  # cpu, cuda, cuda:N or auto: refused here, before OUT is touched
    size = None
    if target_size is not None:
        size = parse_size(target_size, "--target-size")
    if target_bits is not None and size is not None:
        raise QuantizationError("--target-bits and --target-size both set: give one budget")
    targeted = target_bits is not None or size is not None  # recipes chosen on calibration data, any method
    if method == "rtn" and resume and not targeted:
        raise QuantizationError("--resume continues a --method gptq run; an rtn run is one pass: rerun it "
                                "with --overwrite")

    qconfig = QuantConfig(
        method=method,
        experts=ModuleQuant(expert_bits, group_size, not asym),
        attn=ModuleQuant(attn_bits, attn_group_size, not attn_asym),
        lm_head=ModuleQuant(lm_head_bits, -1, not attn_asym),
        layout=layout,
    )
    describe = lambda mq: "bf16" if not mq.quantized else (  # noqa: E731
        f"int{mq.bits} " + ("per-channel" if mq.group_size == -1 else f"g{mq.group_size}")
        + ("" if mq.symmetric else " asym"))
    recipe = (f"  experts {describe(qconfig.experts)}, attention {describe(qconfig.attn)}, "
              f"lm_head {describe(qconfig.lm_head)}; embeddings, norms, router as stored")
    if method == "gptq" or targeted:

        opts = CalibrationOptions(data=calib_data, text_field=calib_field, samples=calib_samples,
                                  seq_len=calib_seq_len, seed=seed, rare_strategy=rare_experts,
                                  min_expert_tokens=min_expert_tokens, device=device, target_bits=target_bits,
                                  target_size=size)
        result = quantize_with_calibration(src, out, qconfig, opts, overwrite=overwrite, resume=resume,
                                           revision=revision)
        first, _, rest = result.summary.partition("\n")
        click.echo(first)
        alloc = result.report.get("quantization_config", {}).get("calibration", {}).get("allocation")
        if alloc:
            mix = ", ".join(f"{n} at {b}" for b, n in alloc["experts_per_recipe"].items() if n)
            recipe = recipe.replace(f"experts {describe(qconfig.experts)}", f"experts per expert ({mix}; predicted "
                                    f"error {alloc['predicted_error']:.4g}, uniform "
                                    + ", ".join(f"{b} {e:.4g}" for b, e in alloc["uniform_predicted_error"].items())
                                    + ")")
        click.echo(recipe)
        if rest:
            click.echo(rest)
        click.echo(f"  report   {result.out / REPORT_NAME}")
        return
    t0 = time.perf_counter()
    folder = quantize_checkpoint(src, out, qconfig, overwrite=overwrite, revision=revision)
    seconds = time.perf_counter() - t0
    n_in, bytes_in = checkpoint_size(_source_dir(src, revision))
    n_out, bytes_out = checkpoint_size(folder)
    click.echo(f"quantized {src} -> {folder} ({method})")
    click.echo(recipe)
    click.echo(f"  tensors  {n_in} in, {n_out} out")
    click.echo(f"  bytes    {format_size(bytes_in)} in, {format_size(bytes_out)} out "
               f"({bytes_in / max(bytes_out, 1):.2f}x smaller)")
    click.echo(f"  time     {seconds:.1f} s ({format_rate(bytes_in, seconds)} of source)")


def _quantize_gguf(src, out, recipe, method, target_size, calib_data, calib_field, calib_samples, calib_seq_len,
                   seed, rare_experts, min_expert_tokens, device, revision, overwrite) -> None:
    """OUT.gguf: llama.cpp's mix ``recipe`` or types allocated to ``target_size``, GPTQ-solved unless rtn."""
    if not out.lower().endswith(".gguf"):
        raise QuantizationError(f"--recipe {recipe} writes a GGUF file: OUT must end in .gguf (got {out})")
    ctx = click.get_current_context()
    given = [n for n in NOT_FOR_GGUF if ctx.get_parameter_source(n) is not ParameterSource.DEFAULT]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise QuantizationError(f"{flag} sets dbrxq's own format; a GGUF file's types come from --recipe or "
                                f"--target-size (docs/gguf.md)")
    if (recipe is None) == (target_size is None):
        raise QuantizationError(f"{out}: a GGUF file needs --recipe ({', '.join(GGUF_RECIPES)}) or --target-size, "
                                f"one of them")
    _choice("--rare-experts", rare_experts, RARE_STRATEGIES)
    parse_device(device)
    opts = CalibrationOptions(data=calib_data, text_field=calib_field, samples=calib_samples, seq_len=calib_seq_len,
                              seed=seed, rare_strategy=rare_experts, min_expert_tokens=min_expert_tokens, device=device)
    recipe = recipe.lower() if recipe else "auto"
    solve = method == "gptq" and recipe != "q8_0"
    size = parse_size(target_size, "--target-size") if target_size is not None else None
    r = export_gguf(src, out, type_=recipe, overwrite=overwrite, revision=revision, progress=sys.stderr.isatty(),
                    calibrate=opts if solve else None, target_size=size, calibration=opts)
    for msg in r.warnings:
        click.echo(f"warning: {msg}", err=True)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(r.types.items(), key=lambda kv: -kv[1]))
    how = "GPTQ onto each tensor's grid" if solve else "rounded to nearest"
    click.echo(f"quantized {src} -> {r.path} (GGUF {recipe if size is None else 'sized to ' + format_size(size)}, {how})")
    click.echo(f"  tensors  {r.tensors} ({kinds})")
    click.echo(f"  bytes    {format_size(r.nbytes)}")
    click.echo(f"  time     {r.seconds:.1f} s")
    click.echo(f"  run it   dbrxq run {r.path}   |   llama-cli -m {r.path}")


def _source_dir(src: str, revision: str | None):

    return resolve_model_dir(src, revision=revision)
