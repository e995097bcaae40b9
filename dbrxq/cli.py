"""The ``dbrxq`` command line: a thin click layer over the Python API.

Every error a user can cause (DbrxqError) is printed as one line on stderr with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import resource
import sys
import time

import click

from .errors import DbrxqError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="dbrxq", prog_name="dbrxq", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Run and quantize Databricks' DBRX on a CPU box or one GPU."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _peak_memory(device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    text = f"peak RSS {rss:.0f} MiB"
    import torch
    if device.type == "cuda":
        text += f", peak GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return text


def threads_option(f):
    """--threads, shared by run, eval, compare and quantize."""
    from .sysinfo import THREADS_HELP
    return click.option("--threads", type=click.IntRange(min=1), help=THREADS_HELP)(f)


class SizeType(click.ParamType):
    """A memory size like 20GiB, 512MiB, 1.5GB (dbrxq.placement.parse_size), as bytes."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        from .placement import BudgetError, parse_size
        if isinstance(value, int):
            return value
        try:
            return parse_size(value, param.opts[0] if param else "size")
        except BudgetError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)


def runtime_options(f):
    """The options that say how a model runs (device, dtype, memory budgets, KV cache, context,
    offloading, threads), shared by run and serve."""
    for opt in reversed([
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (the checkpoint's), float32, bfloat16 or float16."),
        click.option("--revision", help="Hub revision when MODEL is a repo id."),
        click.option("--gpu-memory", type=SizeType(), help="GPU budget (e.g. 20GiB): offload experts that do not fit."),
        click.option("--cpu-memory", type=SizeType(),
                     help="RAM budget (e.g. 8GiB): on CPU the experts that do not fit are read from disk; "
                          "with CUDA, the pinned host tier."),
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
        click.option("--direct-io", is_flag=True,
                     help="With offloading on CPU, read experts with O_DIRECT (bypassing the page cache)."),
        threads_option,
    ]):
        f = opt(f)
    return f


def offload_options(cache_dir, policy, prefetch, direct, timing=False) -> dict:
    """The --cache-dir / --expert-policy / --expert-prefetch / --direct-io / --stats choices that were made."""
    opts = {"cache_dir": cache_dir, "policy": policy, "prefetch": prefetch, "direct": direct or None,
            "timing": timing or None}
    return {k: v for k, v in opts.items() if v is not None}


def _offload_report(rt) -> str:
    """--stats lines for an offloaded run: per decode token latency split, cache, bytes, memory."""
    from .placement import format_size
    from .sysinfo import peak_rss_bytes
    lines = []
    for name, ph in rt.stats.phases.items():
        if not ph.tokens:
            continue
        n = ph.tokens
        lines.append(f"[{name}: per token attention {1e3 * ph.attention_s / n:.1f} ms, experts resident "
                     f"{1e3 * ph.resident_s / n:.1f} ms, experts missed {1e3 * ph.missed_s / n:.1f} ms; hit rate "
                     f"{ph.hit_rate:.1%} ({ph.hits} hits, {ph.misses} misses); moved "
                     f"{format_size(ph.bytes_moved / n)}/token]")
    peak = ", ".join(f"{k} {format_size(v)}" for k, v in rt.stats.peak.items())
    lines.append(f"[tracked peak per tier: {peak}; peak RSS {format_size(peak_rss_bytes())}; "
                 f"prefetched {rt.cache.counters.prefetched}, evictions {rt.cache.counters.evictions}]")
    return "\n".join(lines)


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--prompt", "-p", help="Text to continue (with --chat: the first user message).")
@click.option("--chat", is_flag=True, help="Use the ChatML chat template; without --prompt, an interactive session.")
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
    from .api import load

    if show_plan:
        from .loading import describe_plan
        from .api import resolve_model_name
        click.echo(describe_plan(resolve_model_name(model), device=device, dtype=dtype, revision=revision,
                                 gpu_memory=gpu_memory, cpu_memory=cpu_memory, context=context,
                                 kv_cache=kv_cache))
        return
    if prompt is None and not chat:
        raise click.UsageError("give --prompt TEXT, or --chat for an interactive session")
    from .generate import check_sampling
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
                       f"{_peak_memory(runner.model.device)}]", err=True)
            if runner.offload is not None:
                click.echo(_offload_report(runner.offload), err=True)

    if not chat:
        from .generate import check_request
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
            except (EOFError, click.Abort):  # Ctrl-D, or Ctrl-C at the prompt: the session ends
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


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set an API key).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
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
@click.option("--shutdown-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM/SIGINT, seconds in-flight requests get to finish before they are cancelled.")
@runtime_options
def serve(model, host, port, api_key, model_name, max_batch, max_queue, prefill_chunk, batch_invariant,
          shutdown_timeout, device, dtype, revision, gpu_memory, cpu_memory, kv_cache, context, expert_policy,
          cache_dir, expert_prefetch, direct_io, threads) -> None:
    """Serve MODEL (as for run) over the OpenAI API: POST /v1/chat/completions, /v1/completions,
    GET /v1/models, /health; requests decode together (continuous batching)."""
    from .api import load
    from .engine import Engine
    from .server import Server, check_port, serve as serve_http

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
               host=host, port=port, shutdown_timeout=shutdown_timeout)


def fit_conversation(runner, messages: list[dict], system: str | None, max_new_tokens: int) -> None:
    """Drop the oldest turns (user + assistant pairs; the system prompt is not a turn) until the
    templated conversation plus max_new_tokens fits the model's context, with a one-line notice;
    a last message that alone does not fit raises GenerationError (run's one-line error)."""
    from .errors import GenerationError

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


@cli.command(context_settings=CONTEXT)
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="The cache to look at [default: $DBRXQ_CACHE, else ~/.cache/dbrxq].")
@click.option("--clear", is_flag=True, help="Remove every prepared-expert file (and leftovers of killed runs).")
def cache(cache_dir, clear) -> None:
    """List (or remove) offloading's prepared-expert files: kernel-ready copies of a checkpoint's
    experts, one per checkpoint, kernel and device, written the first time a budget needs them."""
    from .offload import prepared_dir
    from .placement import format_size

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


@cli.command(context_settings=CONTEXT)
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
    file OUT for llama.cpp, Ollama and llama.cpp's RPC backend (README: "Run it elsewhere")."""
    from .export import export_gguf
    from .placement import format_rate, format_size
    r = export_gguf(model, out, type_=type_.lower(), float_type=float_type.lower(), requantize=requantize,
                    overwrite=overwrite, revision=revision, progress=sys.stderr.isatty())
    for msg in r.warnings:
        click.echo(f"warning: {msg}", err=True)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(r.types.items(), key=lambda kv: -kv[1]))
    click.echo(f"exported {model} -> {r.path} (GGUF, file type {r.file_type})")
    click.echo(f"  tensors  {r.tensors} ({kinds})")
    click.echo(f"  bytes    {format_size(r.nbytes)}")
    click.echo(f"  time     {r.seconds:.1f} s ({format_rate(r.nbytes, r.seconds)})")


from quantize.cli import quantize_command  # noqa: E402  (the quantize subcommand lives with quantize/)
cli.add_command(quantize_command, "quantize")
from .eval_cli import compare_command, eval_command  # noqa: E402
cli.add_command(eval_command, "eval"); cli.add_command(compare_command, "compare")


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except DbrxqError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # a full disk, a read-only file system, a file where a folder should be
        from .writer import is_write_error, write_error
        if not is_write_error(e):
            raise
        click.echo(f"error: {write_error(e, e.filename or '.')}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
