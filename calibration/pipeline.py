"""``dbrxq quantize`` with calibration: stream a float DBRX checkpoint layer by layer into OUT.

Data flow (one explicit loop, :func:`quantize_with_calibration`)::

    open SRC lazily (calibration.source) -> sample N x L calibration tokens (calibration.tokens)
    -> x = wte[tokens]  (N, L, D) float32; write the embedding's shard
    -> for each layer i:
         load layer i only (its float tensors, source dtype; a hub SRC downloads its shards now)
         for step in LAYER_STEPS:            # each step sees the earlier steps quantized
             attn.Wqkv, attn.out_proj: run x through the attention, feeding the matrix's inputs
                 into a GPTQ Hessian (capture.feed_inputs); quantize; swap in the quantized matrix
             ffn.experts: run x through the QUANTIZED attention -> h (N*L, D); route with the
                 float router; quantize each expert on the tokens routed to it (calibration.experts;
                 rare experts by the rule there)
         write layer i's shard atomically; record it in the manifest (calibration.progress)
         x = the layer's output computed with the QUANTIZED weights, read from the shard's tensors
         store x (resume point); free the layer
    -> norm_f, lm_head shard; tokenizer files; index; config.json LAST (quantization_config with a
       calibration summary); quantize_report.json; manifest and stored activations removed.

Shards: ``model-00001-of-K`` the embedding, ``model-(i+2)-of-K`` layer i, ``model-K-of-K`` norm_f and
lm_head (K = n_layers + 2). Tensor names, shapes and dtypes are exactly
:func:`quantize.specs.quantized_tensor_specs` (the one definition of the canonical format), so
``dbrxq.load(OUT)`` reads the result like any other quantized checkpoint.

Memory: one source layer in the source dtype (6.3 GB for DBRX in bf16) + its quantized form
(1.7 GB) + activations x, h, out (3 x N*L*D*4 bytes) + one expert's float32 weights and Hessians
(``[D, D]`` and ``[F, F]``), whatever n_layers is.

Propagation uses the reference dequantize-then-float32-matmul numerics (quantize.kernels'
"torch" backend, which every kernel approximates), so the activations and hence the output bytes
do not depend on which kernel this machine would pick. Determinism: the calibration windows
depend only on the data, tokenizer, N, L and seed; everything after is deterministic for a given
torch version, device and thread count (the manifest records the thread count; a resume with
another one warns, since float reductions may round differently). Resume after a crash gives
byte-identical shards, index and config.json (tests/calibration/test_pipeline.py checks it);
quantize_report.json differs in its timings only.

Rare experts (rule in calibration.experts). Measured on the trained demo model (dbrxq/assets/tiny,
d_model 128, 4 layers), int4 per-channel experts, int8 attention, mean KL to the float model over
8K held-out tokens (heldout.txt):

    calibration    RTN      GPTQ, no rule   rare -> RTN   rare -> route-all
    32 x 128       0.00696  0.00443         0.00447       0.00445   (threshold 300: 14 rare)
    8 x 64         0.00696  0.00772         0.00782       0.00773   (default rule: 8 rare)
    8 x 64, every expert treated as rare:   0.00691       0.00595
    4 x 32, every expert treated as rare:   0.00698       0.01034

route-all is as good or better except with 128 tokens in all (where the all-token Hessian itself
has rank < d_model), so it is the default; ``rare_strategy="rtn"`` is the option. Note that GPTQ
needs real calibration data: with <= 512 tokens it is worse than RTN on this model; the default
128 x 512 is far above that.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from calibration.allocation import (
    OPTIONS,
    allocate,
    budget_from_bits,
    budget_from_size,
    expert_bytes,
)
from calibration.experts import RARE_STRATEGIES, ExpertPolicy, default_min_tokens
from calibration.forward import propagate
from calibration.layer import process_layer
from calibration.options import LAYER_STEPS, CalibrationOptions, QuantizeResult, Run
from calibration.parts import plan_parts, write_head, write_index_and_config, write_part
from calibration.progress import (
    MANIFEST_NAME,
    load_activations,
    prepare_out,
    save_activations,
)
from calibration.report import build_report, format_summary, write_report
from calibration.source import open_source
from calibration.tokens import calibration_tokens
from dbrxq.core.errors import DbrxqError, QuantizationError
from dbrxq.core.files import (
    check_disk_space,
    is_write_error,
    remove_stale_temps,
    write_error,
)
from dbrxq.core.sysinfo import describe_machine, parse_device, peak_rss_bytes
from dbrxq.core.untrusted import MAX_INDEX_BYTES, check_finite, read_json
from dbrxq.formats.hub import tokenizer_files
from dbrxq.formats.checkpoint import hub_tensor_shapes
from dbrxq.formats.shards import tensor_nbytes
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize.config import QuantConfig
from quantize.format import FORMAT_VERSION, REPORT_NAME
from quantize.layout import to_canonical
from quantize.specs import resolve_layout

log = logging.getLogger(__name__)

__all__ = ["CalibrationOptions", "QuantizeResult", "quantize_with_calibration", "LAYER_STEPS"]


# --------------------------------------------------------------------------------------------
# Start, end
# --------------------------------------------------------------------------------------------
def _embed(run: Run, tokens: torch.Tensor) -> torch.Tensor:
    c = run.config
    wte = check_finite(run.source.reader.get("transformer.wte.weight", expected_shape=(c.vocab_size, c.d_model)),
                       "transformer.wte.weight", run.source.reader.file_of("transformer.wte.weight"))
    if not run.progress.done("embed"):
        write_part(run, "embed", {"transformer.wte.weight": wte})
    return wte[tokens].to(run.device, torch.float32)  # (N, L, D)


def _start(run: Run, tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The first unfinished layer and its input activations (stored, or recomputed from OUT)."""
    done = [i for i in range(run.config.n_layers) if run.progress.done(f"layer.{i}")]
    k = len(done)
    assert done == list(range(k)), done
    x = _embed(run, tokens)
    if k:
        stored = load_activations(run.progress, k)
        if stored is not None:
            log.info("resuming at layer %d from the stored activations", k)
            return k, stored.to(run.device)
        log.info("resuming at layer %d: recomputing the activations through layers 0..%d of %s", k, k - 1, run.out)
        for i in range(k):
            written = to_canonical(load_file(str(run.out / run.shard[f"layer.{i}"])), run.config, run.qconfig)
            x = propagate(written, run, i, x)
    return k, x


def _target(opts: CalibrationOptions, qconfig: QuantConfig, config, source) -> tuple[dict, int] | None:
    """(what was asked, the expert byte budget) for --target-bits / --target-size, else None."""
    if opts.target_bits is None and opts.target_size is None:
        return None
    if opts.target_bits is not None and opts.target_size is not None:
        raise QuantizationError("--target-bits and --target-size both set: give one budget")
    if not qconfig.experts.quantized:
        raise QuantizationError("--target-bits/--target-size choose recipes for the experts, which this recipe "
                                "keeps in 16 bits")
    for o in OPTIONS:
        try:
            expert_bytes(config, o)
        except QuantizationError as e:
            raise QuantizationError(f"--target-bits/--target-size choose among {len(OPTIONS)} recipes; the one of "
                                    f"{o.bits} bits with group size {o.group_size} does not fit this model's "
                                    f"experts (d_model {config.d_model}, ffn {config.ffn_hidden_size}): {e}") from None
    if opts.target_bits is not None:
        return {"bits": opts.target_bits}, budget_from_bits(config, opts.target_bits, layout=qconfig.layout)
    copied = sum(p.stat().st_size for p in tokenizer_files(source.folder)) if source.folder.is_dir() else 0
    return {"size_bytes": opts.target_size}, budget_from_size(config, qconfig, source.float_dtypes(), opts.target_size,
                                                              copied=copied)


def _check_options(opts: CalibrationOptions, qconfig: QuantConfig, config) -> None:
    if opts.rare_strategy not in RARE_STRATEGIES:
        raise QuantizationError(f"rare expert strategy {opts.rare_strategy!r} is not one of {RARE_STRATEGIES}")
    if opts.seq_len > config.max_seq_len:
        raise QuantizationError(f"--calib-seq-len {opts.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    if opts.min_expert_tokens is not None and opts.min_expert_tokens < 1:
        raise QuantizationError(f"min_expert_tokens must be >= 1, got {opts.min_expert_tokens}")
    if opts.chunk_tokens < 1:
        raise QuantizationError(f"chunk_tokens must be >= 1, got {opts.chunk_tokens}")


def quantize_with_calibration(src: str | Path, out: str | Path, qconfig: QuantConfig,
                              options: CalibrationOptions | None = None, *, overwrite: bool = False,
                              resume: bool = False, revision: str | None = None,
                              progress: bool = True) -> QuantizeResult:
    """Quantize the float DBRX checkpoint ``src`` into ``out``, layer by layer, with calibration.

    Args:
        src: a local folder or a hub repo id (shards fetched as the loop reaches them).
        out: output folder; complete only once its config.json exists.
        qconfig: the recipe; ``method`` "gptq" or "rtn" (rtn is measured on the same calibration
            data, so the reports of the two are comparable).
        options: calibration settings (:class:`CalibrationOptions`).
        overwrite: replace what a non-empty ``out`` holds (config.json removed first).
        resume: continue the unfinished run in ``out`` (same settings only).
        progress: tqdm bars per layer and per expert.
    Returns:
        :class:`QuantizeResult` (folder, report dict, one-screen summary).
    Raises:
        DbrxqError subclasses with one line: bad SRC, bad options or data, OUT conflicts, disk space.
    """
    t0 = time.perf_counter()
    opts = options or CalibrationOptions()
    out = Path(out)
    source = open_source(str(src), revision=revision)
    try:
        config = source.config
        _check_options(opts, qconfig, config)
        qconfig.check_writable()
        qconfig = resolve_layout(config, qconfig)
        device = parse_device(opts.device)
        torch.manual_seed(opts.seed)
        tokenizer = DbrxTokenizer.from_pretrained(source.folder)
        tokens, data_info = calibration_tokens(opts.data, tokenizer, samples=opts.samples, seq_len=opts.seq_len,
                                               seed=opts.seed, text_field=opts.text_field,
                                               vocab_size=config.vocab_size)
        min_tokens = opts.min_expert_tokens or default_min_tokens(config.d_model)
        calib = {"method": qconfig.method, **data_info, "tokens": opts.samples * opts.seq_len,
                 "rare_strategy": opts.rare_strategy, "min_expert_tokens": min_tokens, "damp": opts.damp,
                 "act_order": opts.act_order}
        target = _target(opts, qconfig, config, source)
        if target is not None:
            calib["target"] = target[0]
        qdict = {k: v for k, v in qconfig.to_dict().items() if k != "calibration"}
        settings = {"format_version": FORMAT_VERSION, "quantization": qdict, "calibration": dict(calib),
                    "source": source.identity}
        remove_stale_temps(out)  # shards and manifests of killed runs, before OUT's contents are judged
        prepare_out(out, source.folder, settings, resume=resume, overwrite=overwrite, dry_run=True)
        plan_parts(config, qconfig, source.float_dtypes())  # recipe errors before the (long) allocation pass
        policy = ExpertPolicy(qconfig.method, opts.rare_strategy, min_tokens, opts.damp, opts.act_order,
                              opts.chunk_tokens)
        predicted = None
        if target is not None:  # one float pass measures every expert, then the recipes are chosen
            probe = Run(source, qconfig, opts, policy, out, device, None, {}, {}, progress)
            mix, info = allocate(probe, tokens, target[1], target[0])
            qconfig = dataclasses.replace(qconfig, expert_mix=mix)
            predicted = info.pop("predicted")
            info.pop("tokens")
            calib["allocation"] = info
        specs, shard = plan_parts(config, qconfig, source.float_dtypes())
        created = not out.exists()
        had_manifest = (out / MANIFEST_NAME).is_file()
        try:
            prog = prepare_out(out, source.folder, settings, resume=resume, overwrite=overwrite)
        except OSError as e:
            if is_write_error(e):
                raise write_error(e, out) from None
            raise
        if prog is None:
            return _already_complete(out)
        run = Run(source, qconfig, opts, policy, out, device, prog, specs, shard, progress, predicted)
        remaining = sum(tensor_nbytes(s, d) for part, sp in specs.items() if not prog.done(part) for _, s, d in sp)
        need = remaining + 2 * tokens.numel() * config.d_model * 4 * opts.save_activations
        try:
            check_disk_space(out, need)
        except QuantizationError:
            if not had_manifest:  # a failed up-front check leaves nothing that changes the next run
                prog.remove()
                if created:
                    shutil.rmtree(out, ignore_errors=True)
            raise
        try:
            report, calib = _run_layers(run, tokens, calib, src, out, t0)
        except OSError as e:
            if is_write_error(e):
                raise write_error(e, out, need) from None
            raise
    finally:
        source.close()
    summary = format_summary(report)
    log.info("%s", summary)
    return QuantizeResult(out, report, summary)


def _run_layers(run: Run, tokens: torch.Tensor, calib: dict, src, out: Path, t0: float) -> tuple[dict, dict]:
    """The layer loop, the head and the finishing files of a prepared run; returns (report, calib)."""
    config, prog, opts, qconfig, source = run.config, run.progress, run.opts, run.qconfig, run.source
    k, x = _start(run, tokens)
    with tqdm(total=config.n_layers, initial=k, desc="layers", unit="layer", disable=not run.show) as bar:
        for i in range(k, config.n_layers):
            x = process_layer(run, i, x)
            if opts.save_activations and i + 1 < config.n_layers:
                save_activations(prog, x, i + 1)
            bar.update(1)
    del x
    if not prog.done("head"):
        write_head(run)
    layers = [prog.entry(f"layer.{i}")["report"] for i in range(config.n_layers)]
    calib["rare_experts"] = sum(ex["rare"] for L in layers for ex in L["experts"])
    calib["settings_sha256"] = prog.data["settings_sha256"]
    qc = write_index_and_config(run, calib)
    dtypes = source.float_dtypes()
    bytes_in = sum(tensor_nbytes(s, dtypes[n]) for n, s in hub_tensor_shapes(config).items())
    bytes_out = sum(e["bytes"] for e in prog.data["parts"].values())
    report = build_report(src=str(src), out=str(out), method=qconfig.method, quantization_config=qc,
                          calibration=calib, layers=layers, seconds=time.perf_counter() - t0,
                          peak_rss_bytes=peak_rss_bytes(), bytes_in=bytes_in, bytes_out=bytes_out,
                          machine=describe_machine(), threads=torch.get_num_threads())
    write_report(report, out / REPORT_NAME)
    prog.remove()
    return report, calib


def _already_complete(out: Path) -> QuantizeResult:
    path = out / REPORT_NAME
    try:
        report = read_json(path, MAX_INDEX_BYTES, folder=out) if path.is_file() else {}
    except DbrxqError:
        report = None
    if not isinstance(report, dict):
        report = {}
    return QuantizeResult(out, report, format_summary(report) if report else f"{out} is already complete")
