"""The ``dbrxq`` command line: a thin click layer over the Python API.

Every error a user can cause (DbrxqError) is printed as one line on stderr with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import time

import click

from dbrxq.api import load
from dbrxq.cli.options import (
    CONTEXT,
    Seconds,
    offload_options,
    offload_report,
    peak_memory,
    runtime_options,
)
from dbrxq.core.errors import DbrxqError, GenerationError
from dbrxq.core.units import format_rate, format_size
from dbrxq.export.gguf import export_gguf
from dbrxq.formats.hub import resolve_model_name
from dbrxq.plan.checkpoint import describe_plan
from dbrxq.runtime.generate import check_request, check_sampling
from dbrxq.runtime.prepared import prepared_dir
from dbrxq.serve.engine import Engine
from dbrxq.serve.http import check_port, check_serve_names
from quantize.convert import convert_checkpoint
from dbrxq.serve.http import serve as serve_http
from dbrxq.serve.server import Server


@click.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--prompt", "-p", help="Text to continue (with --chat: the first user message).")
@click.option("--chat", is_flag=True, help="Use the ChatML chat template; without --prompt, an interactive chat.")
@click.option("--system", help="System prompt for --chat (default: DBRX-instruct's).")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample among the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), help="Nucleus sampling mass.")
@click.option("--seed", type=int, help="Seed for sampling (reproducible output).")
@click.option("--stats", is_flag=True,
              help="Print tokens per second and peak memory; with offloading also the per-token latency "
                   "split, cache hit rate and bytes moved.")
@click.option("--plan", "show_plan", is_flag=True, help="Print the memory placement plan and exit.")
@runtime_options
def run(model, prompt, chat, system, max_new_tokens, temperature, top_k, top_p, seed, device, dtype,
        revision, stats, gpu_memory, cpu_memory, kv_cache, context, show_plan, expert_policy, cache_dir,
        expert_prefetch, direct_io, threads) -> None:
    """Generate text with MODEL (a folder or hub repo id; default, or "demo": the small model shipped
    with dbrxq; a local folder named demo wins).

    Tokens stream to stdout as they are made.
    """

    if show_plan:
        click.echo(describe_plan(resolve_model_name(model), device=device, dtype=dtype, revision=revision,
                                 gpu_memory=gpu_memory, cpu_memory=cpu_memory, context=context,
                                 kv_cache=kv_cache))
        return
    if prompt is None and not chat:
        raise click.UsageError("give --prompt TEXT, or --chat for an interactive chat")
    check_sampling(temperature, top_k, top_p, seed)  # before the model loads
    runner = load(model, device=device, dtype=dtype, revision=revision, gpu_memory=gpu_memory,
                  cpu_memory=cpu_memory, context=context, kv_cache=kv_cache, threads=threads,
                  offload_options=offload_options(cache_dir, expert_policy, expert_prefetch, direct_io,
                                                  timing=stats))
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

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
        return
    messages: list[dict] = []
    interactive = prompt is None
    while True:
        if interactive:
            try:
                prompt = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False)
            except (EOFError, click.Abort):  # Ctrl-D, or Ctrl-C at the prompt: the chat ends
                emit("\n")
                return
            if not prompt.strip():
                continue
        messages.append({"role": "user", "content": prompt})
        try:
            fit_conversation(runner, messages, system, max_new_tokens)
        except DbrxqError as e:  # the new message alone does not fit
            messages.pop()
            if not interactive:
                raise
            click.echo(f"error: {e}", err=True)
            continue
        said: list[str] = []
        try:
            reply = runner.chat(messages, system_prompt=system, on_text=lambda t: (said.append(t), emit(t)), **kw)
        except KeyboardInterrupt:  # Ctrl-C during a reply stops it; the conversation goes on
            reply = "".join(said)
            click.echo("\n[reply interrupted]", err=True)
        emit("\n")
        report()
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            return


@click.command(context_settings=CONTEXT)
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


def fit_conversation(runner, messages: list[dict], system: str | None, max_new_tokens: int) -> None:
    """Drop the oldest turns (user + assistant pairs; the system prompt is not a turn) until the
    templated conversation plus max_new_tokens fits the model's context, with a one-line notice;
    a last message that alone does not fit raises GenerationError (run's one-line error)."""

    ctx = runner.model.config.max_seq_len
    dropped = 0

    def need() -> int:
        return len(runner.tokenizer.apply_chat_template(messages, system_prompt=system)) + max_new_tokens

    while need() > ctx and len(messages) > 1:
        del messages[:2 if len(messages) > 2 else 1]
        dropped += 1
    if need() > ctx:
        raise GenerationError(f"this message, the system prompt and --max-new-tokens {max_new_tokens} need "
                              f"{need()} tokens, beyond the model's context of {ctx}")
    if dropped:
        click.echo(f"[context full: dropped the {dropped} oldest turn(s); {ctx} tokens of context]", err=True)


@click.command(context_settings=CONTEXT)
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="The cache to look at [default: $DBRXQ_CACHE, else ~/.cache/dbrxq].")
@click.option("--clear", is_flag=True, help="Remove every prepared-expert file (and leftovers of killed runs).")
def cache(cache_dir, clear) -> None:
    """List (or remove) offloading's prepared-expert files: kernel-ready copies of a checkpoint's
    experts, one per checkpoint, kernel and device, written the first time a budget needs them."""

    root = prepared_dir(cache_dir)
    every = sorted(p for p in root.glob("*") if p.is_file()) if root.is_dir() else []
    files = [p for p in every if p.suffix == ".bin"]  # + their .json sidecars and leftovers of killed runs
    total = sum(p.stat().st_size for p in every)
    if clear:
        for p in every:
            p.unlink()
        click.echo(f"removed {len(files)} file(s), {format_size(total)}, from {root}")
        return
    for p in files:
        click.echo(f"{format_size(p.stat().st_size):>12}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(p.stat().st_mtime))}  {p}")
    click.echo(f"{len(files)} file(s), {format_size(total)}, in {root}")


@click.command(context_settings=CONTEXT)
@click.argument("model")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--type", "type_", default="auto", show_default=True,
              type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0", "q4_0"], case_sensitive=False),
              help="Float checkpoints only: the type of the experts and attention (q8_0/q4_0 quantize them "
                   "with dbrxq's RTN, g32). auto: quantized checkpoints keep their codes (int4 sym -> Q4_0, "
                   "int4 asym -> Q4_1, int8 sym -> Q8_0); float ones keep their precision.")
@click.option("--float-type", default="auto", show_default=True,
              type=click.Choice(["auto", "f32", "f16", "bf16"], case_sensitive=False),
              help="Type of the unquantized matrices (embedding, output head); auto = as stored. "
                   "Norms and the router are always F32.")
@click.option("--requantize", is_flag=True,
              help="Re-round tensors whose recipe has no exact GGML type (int8 asym -> Q8_0), with a warning.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--revision", help="Hub revision when MODEL is a repo id.")
def export(model, out, type_, float_type, requantize, overwrite, revision) -> None:
    """Write MODEL (a dbrxq-quantized or float checkpoint folder, a hub repo id, or demo) as the GGUF
    file OUT for llama.cpp, Ollama and llama.cpp's RPC backend (docs/gguf.md)."""
    r = export_gguf(model, out, type_=type_.lower(), float_type=float_type.lower(), requantize=requantize,
                    overwrite=overwrite, revision=revision, progress=sys.stderr.isatty())
    for msg in r.warnings:
        click.echo(f"warning: {msg}", err=True)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(r.types.items(), key=lambda kv: -kv[1]))
    click.echo(f"exported {model} -> {r.path} (GGUF, file type {r.file_type})")
    click.echo(f"  tensors  {r.tensors} ({kinds})")
    click.echo(f"  bytes    {format_size(r.nbytes)}")
    click.echo(f"  time     {r.seconds:.1f} s ({format_rate(r.nbytes, r.seconds)})")


@click.command(context_settings=CONTEXT)
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
