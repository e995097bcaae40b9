"""The ``dbrxq`` command line: a thin click layer over the Python API.

Every error a user can cause (DbrxqError) is printed as one line on stderr with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import time

import click

from calibration.options import CalibrationOptions
from dbrxq.api import load
from dbrxq.cli.chat import chat_loop
from dbrxq.cli.options import (
    CONTEXT,
    examples,
    Seconds,
    offload_options,
    offload_report,
    peak_memory,
    runtime_options,
)
from dbrxq.core.errors import ConfigError
from dbrxq.core.sysinfo import busy_before
from dbrxq.core.units import format_rate, format_size, parse_size
from dbrxq.export.gguf import TYPES, export_gguf
from dbrxq.formats.hub import resolve_model_name
from dbrxq.plan.checkpoint import describe_plan
from dbrxq.runtime.generate import Penalties, check_request, check_sampling
from dbrxq.runtime.cache_index import cache_entries, same_checkpoint
from dbrxq.runtime.prepared import prepared_dir
from dbrxq.serve.engine import Engine
from dbrxq.serve.http import check_port, check_serve_names
from quantize.convert import convert_checkpoint
from dbrxq.serve.http import serve as serve_http
from dbrxq.serve.server import Server


# Ollama's defaults (llama.cpp's but for the repetition penalty): readable text from the start; -t 0
# is exact greedy decoding, with no penalty unless one is asked for.
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}
MAX_PROMPT_CHARS = 16 << 20  # a prompt file: far beyond any context (DBRX's 32768 tokens are ~130,000 characters)
ALL = "\0all"  # --clear with no MODEL


@click.command(context_settings=CONTEXT, epilog=examples(
    'dbrxq run -p "The function returns"                 # the embedded demo model',
    'dbrxq run MODEL -f prompt.txt -n 200 --stop "\\n\\n"',
    'echo "Explain MoE" | dbrxq run MODEL --chat -f -',
    'dbrxq run MODEL --chat --system ""                  # a chat without the system prompt',
    'dbrxq run MODEL -p "def f(x):" -t 0                  # exact greedy decoding',
    'dbrxq run MODEL --cpu-memory 20GiB --stats           # offload experts, report speed',
))
@click.argument("model", required=False)
@click.option("--prompt", "-p", help="Text to continue (with --chat: the first user message).")
@click.option("--file", "-f", "prompt_file", type=click.File("r", encoding="utf-8"),
              help="Read the prompt from FILE ('-': standard input) instead of --prompt.")
@click.option("--chat", is_flag=True, help="Use the ChatML chat template; without --prompt, an interactive chat.")
@click.option("--system", help="System prompt for --chat (default: DBRX-instruct's, ~520 tokens; '' for none).")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", "-t", default=DEFAULT_SAMPLING["temperature"], show_default=True,
              type=click.FloatRange(min=0), help="0 is exact greedy decoding (no sampling, no penalty).")
@click.option("--top-k", type=click.IntRange(min=1), default=DEFAULT_SAMPLING["top_k"], show_default=True,
              help="Sample among the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=DEFAULT_SAMPLING["top_p"],
              show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, help="Seed for sampling (reproducible output).")
@click.option("--stop", multiple=True, help="End the text at this string (not printed); repeatable.")
@click.option("--repeat-penalty", type=float,
              help="Divide the logits of tokens already seen (prompt and output) by this; 1 is off "
                   f"[default: {DEFAULT_SAMPLING['repeat_penalty']} when sampling, 1 with -t 0].")
@click.option("--presence-penalty", default=0.0, show_default=True, type=float,
              help="Subtract this from the logit of every token already generated (-2 to 2).")
@click.option("--frequency-penalty", default=0.0, show_default=True, type=float,
              help="Subtract this once per time a token was generated (-2 to 2).")
@click.option("--stats", is_flag=True,
              help="Print tokens per second and peak memory; with offloading also the per-token latency "
                   "split, cache hit rate and bytes moved.")
@click.option("--plan", "show_plan", is_flag=True, help="Print the memory placement plan and exit.")
@runtime_options
def run(model, prompt, prompt_file, chat, system, max_new_tokens, temperature, top_k, top_p, seed, stop,
        repeat_penalty, presence_penalty, frequency_penalty, device, dtype, revision, stats, gpu_memory, cpu_memory,
        kv_cache, context, show_plan, expert_policy, cache_dir, expert_prefetch, direct_io, threads) -> None:
    """Generate text with MODEL (a folder, a hub repo id, or a DBRX .gguf file; default, or "demo": the small
    model shipped with dbrxq; a local folder named demo wins).

    Tokens stream to stdout as they are made.
    """

    if show_plan:
        click.echo(describe_plan(resolve_model_name(model), device=device, dtype=dtype, revision=revision,
                                 gpu_memory=gpu_memory, cpu_memory=cpu_memory, context=context,
                                 kv_cache=kv_cache))
        return
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt TEXT or --file FILE, not both")
    if prompt_file is not None:
        prompt = prompt_file.read(MAX_PROMPT_CHARS + 1)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise click.UsageError(f"--file {prompt_file.name}: more than {MAX_PROMPT_CHARS} characters; a prompt "
                                   f"is at most the model's context")
    if prompt is None and not chat:
        raise click.UsageError("give --prompt TEXT, --file FILE (- for standard input), or --chat for an "
                               "interactive chat")
    check_sampling(temperature, top_k, top_p, seed)  # before the model loads
    busy = busy_before(threads)
    if repeat_penalty is None:
        repeat_penalty = DEFAULT_SAMPLING["repeat_penalty"] if temperature > 0 else 1.0
    penalties = Penalties(repeat_penalty, presence_penalty, frequency_penalty).check()
    runner = load(model, device=device, dtype=dtype, revision=revision, gpu_memory=gpu_memory,
                  cpu_memory=cpu_memory, context=context, kv_cache=kv_cache, threads=threads,
                  offload_options=offload_options(cache_dir, expert_policy, expert_prefetch, direct_io,
                                                  timing=stats))
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
              stop=stop, penalties=penalties)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def report() -> None:
        if stats:
            s = runner.last_output.stats
            click.echo(f"[prefill {s.prompt_tokens} tok in {s.prefill_s:.3f}s = {s.prefill_tok_s:.1f} tok/s; "
                       f"decode {s.decode_steps} tok in {s.decode_s:.3f}s = {s.decode_tok_s:.1f} tok/s; "
                       f"{peak_memory(runner.model.device)}]", err=True)
            if runner.offload is not None:
                click.echo(offload_report(runner.offload), err=True)

    if not chat:
        # refuse a prompt beyond the context before echoing it (generate would, after the echo)
        check_request(runner.model, [runner.tokenizer.encode(prompt)], max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        emit(prompt)
        runner.generate(prompt, on_text=emit, **kw)
        emit("\n")
        report()
        if busy:
            click.echo(busy, err=True)
        return
    chat_loop(runner, prompt, system, kw, emit, report)


@click.command(context_settings=CONTEXT, epilog=examples(
    'dbrxq serve                                          # the demo model on 127.0.0.1:8000',
    'dbrxq serve MODEL --port 8000 --api-key "$KEY" --max-batch 8',
    'dbrxq serve MODEL --host 0.0.0.0 --api-key "$KEY" --cpu-memory auto',
))
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set an API key).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", envvar="DBRXQ_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every request.")
@click.option("--model-name", help="The model id clients pass and /v1/models lists [default: MODEL as given, or demo].")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Requests decoding together (KV cache slots of --context positions each).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting for a slot; beyond them the server answers 503.")
@click.option("--prefill-chunk", default=512, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens per prefill pass; decoding requests wait at most one pass.")
@click.option("--batch-invariant/--no-batch-invariant", default=True, show_default=True,
              help="Compute every request bit for bit as alone (float layers then run row by row; quantized "
                   "layers on dbrxq's CPU kernels are batched either way).")
@click.option("--shutdown-timeout", default=10.0, show_default=True, type=Seconds(3600),
              help="On SIGTERM/SIGINT, seconds in-flight requests get to finish before they are cancelled.")
@click.option("--body-timeout", default=30.0, show_default=True, type=Seconds(3600),
              help="Seconds a request's body may take to arrive (408 after that).")
@runtime_options
def serve(model, host, port, api_key, model_name, max_batch, max_queue, prefill_chunk, batch_invariant,
          shutdown_timeout, body_timeout, device, dtype, revision, gpu_memory, cpu_memory, kv_cache, context, expert_policy,
          cache_dir, expert_prefetch, direct_io, threads) -> None:
    """Serve MODEL (as for run) over the OpenAI API: POST /v1/chat/completions, /v1/completions,
    GET /v1/models, /health; requests decode together (continuous batching)."""

    check_serve_names(api_key, model_name)
    check_port(host, port)  # before a load that can take minutes

    def loader():  # runs on the engine's thread, which then owns every torch call
        return load(model, device=device, dtype=dtype, revision=revision, gpu_memory=gpu_memory,
                    cpu_memory=cpu_memory, context=context, batch_size=max_batch, kv_cache=kv_cache,
                    threads=threads,
                    offload_options=offload_options(cache_dir, expert_policy, expert_prefetch, direct_io))

    engine = Engine(loader, max_batch=max_batch, max_queue=max_queue, context=context, kv_cache=kv_cache,
                    prefill_chunk=prefill_chunk, invariant=batch_invariant).wait_ready()
    runner = engine.runner
    name = model_name or (str(model) if model else "demo")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: listening on {host} without an API key: anyone who reaches this port can use it",
                   err=True)
    click.echo(f"serving {name} ({runner.config.n_layers} layers, {engine.max_batch} slots x {engine.context} "
               f"tokens) at http://{host}:{port}/v1", err=True)
    serve_http(Server(engine, runner.tokenizer, model_name=name, stop_tokens=runner.stop_tokens, api_key=api_key),
               host=host, port=port, shutdown_timeout=shutdown_timeout, body_timeout=body_timeout)


@click.command(context_settings=CONTEXT, epilog=examples(
    'dbrxq cache                                          # each file: size, last use, its checkpoint',
    'dbrxq cache --clear MODEL                            # one checkpoint\'s files',
    'dbrxq cache --clear-stale                            # files whose checkpoint is gone or changed',
    'dbrxq cache --clear                                  # everything',
))
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="The cache to look at [default: $DBRXQ_CACHE, else ~/.cache/dbrxq].")
@click.option("--clear", is_flag=False, flag_value=ALL, default=None, metavar="[MODEL]",
              help="Remove the files of checkpoint MODEL, or with no MODEL every file (and leftovers of killed runs).")
@click.option("--clear-stale", is_flag=True, help="Remove the files whose checkpoint is gone or changed.")
def cache(cache_dir, clear, clear_stale) -> None:
    """List (or remove) offloading's prepared-expert files: kernel-ready copies of a checkpoint's
    experts, one per checkpoint, kernel and device, written the first time a budget needs them."""

    root = prepared_dir(cache_dir)
    entries = cache_entries(root)
    if clear is not None or clear_stale:
        if clear == ALL:
            chosen = entries
        elif clear is not None:
            folder = resolve_model_name(clear)
            chosen = [e for e in entries if same_checkpoint(e, folder)]
            if not chosen:
                raise ConfigError(f"--clear {clear}: no file in {root} was built from {folder}")
        else:
            chosen = [e for e in entries if e.stale]
        for e in chosen:
            for p in e.files:
                p.unlink(missing_ok=True)
        click.echo(f"removed {len(chosen)} file(s), {format_size(sum(e.nbytes for e in chosen))}, from {root}")
        return
    for e in entries:
        click.echo(f"{e.describe()}\n{'':>14}{root / (e.key + '.bin')}")
    stale = sum(1 for e in entries if e.stale)
    click.echo(f"{len(entries)} file(s), {format_size(sum(e.nbytes for e in entries))}, in {root}"
               + (f"; {stale} stale (`dbrxq cache --clear-stale` removes them)" if stale else ""))


@click.command(context_settings=CONTEXT, epilog=examples(
    'dbrxq export QUANTIZED model.gguf                    # its codes as they are: Q4_0 / Q4_1 / Q8_0',
    'dbrxq export FLOAT model.gguf --type q8_0            # a float checkpoint, quantized on the way',
    'dbrxq export FLOAT model.gguf --type q4_k_m          # llama.cpp\'s Q4_K_M mix, rounded by dbrxq',
    'dbrxq export FLOAT model.gguf --type q4_k_m --calibrate   # ... solved by GPTQ on calibration text',
    'dbrxq export FLOAT model.gguf --target-size 40GB --calibrate  # each tensor\'s type chosen to fit',
    'llama-cli -m model.gguf -p "The function returns"    # then run it in llama.cpp or Ollama',
))
@click.argument("model")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--type", "type_", default="auto", show_default=True,
              type=click.Choice(TYPES, case_sensitive=False),
              help="Float checkpoints only: the type of the experts and attention (q8_0/q4_0 quantize them "
                   "with dbrxq's RTN, g32; q2_k ... q6_k are llama.cpp's K-quant mixes, per tensor as "
                   "llama-quantize chooses, rounded by dbrxq). auto: quantized checkpoints keep their codes "
                   "(int4 sym -> Q4_0, int4 asym -> Q4_1, int8 sym -> Q8_0); float ones keep their precision.")
@click.option("--float-type", default="auto", show_default=True,
              type=click.Choice(["auto", "f32", "f16", "bf16"], case_sensitive=False),
              help="Type of the unquantized matrices (embedding, output head); auto = as stored. "
                   "Norms and the router are always F32.")
@click.option("--requantize", is_flag=True,
              help="Re-round tensors whose recipe has no exact GGML type (int8 asym -> Q8_0), with a warning.")
@click.option("--target-size", metavar="SIZE",
              help="Float checkpoints: a file of at most SIZE (e.g. 40GB, 38GiB), each matrix in the K-quant "
                   "(or Q8_0, F16) type that keeps the predicted KL to the float model least, measured on "
                   "calibration text (docs/gguf.md); instead of --type.")
@click.option("--calibrate", is_flag=True,
              help="With a K-quant mix or --target-size: solve the attention, expert and output matrices by GPTQ "
                   "onto their grids on calibration text (as dbrxq quantize does), instead of rounding to nearest.")
@click.option("--calib-data", metavar="PATH", help="Calibration text for --calibrate: .txt, .jsonl or "
              "hf://datasets/... [default: the packaged calibration/data/calib.txt].")
@click.option("--calib-samples", default=64, show_default=True, type=click.IntRange(1, 1 << 16),
              help="Calibration sequences.")
@click.option("--calib-seq-len", default=512, show_default=True, type=click.IntRange(2, 1 << 16),
              help="Tokens per calibration sequence.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--revision", help="Hub revision when MODEL is a repo id.")
def export(model, out, type_, float_type, requantize, target_size, calibrate, calib_data, calib_samples,
           calib_seq_len, overwrite, revision) -> None:
    """Write MODEL (a dbrxq-quantized or float checkpoint folder, a hub repo id, or demo) as the GGUF
    file OUT for llama.cpp, Ollama and llama.cpp's RPC backend (docs/gguf.md)."""
    options = CalibrationOptions(data=calib_data, samples=calib_samples, seq_len=calib_seq_len)
    size = parse_size(target_size, "--target-size") if target_size is not None else None
    r = export_gguf(model, out, type_=type_.lower(), float_type=float_type.lower(), requantize=requantize,
                    overwrite=overwrite, revision=revision, progress=sys.stderr.isatty(),
                    calibrate=options if calibrate else None, target_size=size, calibration=options)
    for msg in r.warnings:
        click.echo(f"warning: {msg}", err=True)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(r.types.items(), key=lambda kv: -kv[1]))
    click.echo(f"exported {model} -> {r.path} (GGUF, file type {r.file_type})")
    click.echo(f"  tensors  {r.tensors} ({kinds})")
    click.echo(f"  bytes    {format_size(r.nbytes)}")
    click.echo(f"  time     {r.seconds:.1f} s ({format_rate(r.nbytes, r.seconds)})")


@click.command(context_settings=CONTEXT, epilog=examples(
    'dbrxq convert SRC OUT                                # to the blocks layout (loads by mapping)',
    'dbrxq convert SRC OUT --layout canonical',
))
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--layout", default="blocks", show_default=True, type=click.Choice(["blocks", "canonical"]),
              help="The layout to write.")
@click.option("--overwrite", is_flag=True, help="Replace what OUT holds.")
@click.option("--revision", help="Hub revision when SRC is a repo id.")
def convert(src, out, layout, overwrite, revision) -> None:
    """Rewrite the dbrxq-quantized checkpoint SRC into OUT in another layout, number for number:
    blocks (the CPU kernel's own bytes: loads as a memory map, offloads without a prepared copy) or
    canonical (per-weight codes and scales, as older dbrxq versions wrote).

    \b
    Example:
      dbrxq convert dbrx-int4 dbrx-int4-blocks          # a checkpoint written before format_version 4
    """
    t0 = time.perf_counter()
    path = convert_checkpoint(resolve_model_name(src), out, layout=layout, overwrite=overwrite, revision=revision,
                              progress=sys.stderr.isatty())
    click.echo(f"converted {src} -> {path} ({layout} layout) in {time.perf_counter() - t0:.1f} s")
